"""Today's ways of computing what each op computes: the bench's baselines (and ``demo``'s).

One small module each; none imports peft, transformers or matplotlib at import time, so the demo
can use them without those installed.

prefix attention: :mod:`.prefix_sdpa` (``torch.cat`` + SDPA, explicit bool mask, GQA via
``repeat_interleave``), :mod:`.prefix_flex` (FlexAttention with a block mask, where it runs).
multi-LoRA: :mod:`.lora_loop` (PEFT ``adapter_names`` style loop), :mod:`.lora_gather_bmm`
(gather per-row weights + bmm), :mod:`.lora_bgmv` (padded-rank gather, Triton; torch fallback),
:mod:`.lora_peft` (PEFT's own forward on a one-Linear module).
soft prompts: :mod:`.prompt_cat` (embedding + expand + ``torch.cat``), :mod:`.prompt_peft`
(PEFT's prompt-tuning input path).
"""
