"""One config / apply API for every PEFT method of the library.

    from peft_kernels import api
    runner = api.apply(model, api.LoraConfig(r=16), name="task_a")
    api.trainable_parameters(runner)            # (trainable, total)

``apply(model, config, name)`` returns the object that runs the model:

- ``LoraConfig``, ``PrefixTuningConfig``, ``PTuningV2Config``, ``PromptTuningConfig``,
  ``PTuningConfig``: a :class:`~peft_kernels.MultiAdapterModel` holding adapter ``name``; run it as
  ``runner(input_ids, ...)`` (the first adapter applied is made active and stays so; pass
  ``adapter_names`` per row to mix, or ``runner.set_adapter(name)``);
- ``VPTConfig``: a :class:`~peft_kernels.methods.vpt.VisualPromptTuning`;
  ``runner(pixel_values, task_index=...)``;
- ``BottleneckConfig``: a :class:`~peft_kernels.methods.bottleneck.BottleneckAdapterModel`;
  ``runner(input_ids, ..., adapter_names=...)`` (None = the only adapter loaded);
- ``BitFitConfig``, ``LayerNormTuningConfig``, ``HeadTuningConfig``, ``TopKLayersConfig``: the model
  itself, frozen except the tuned parameters.

Passing a ``MultiAdapterModel`` (or a ``BottleneckAdapterModel``) as ``model`` adds another adapter
to it. Wrapping a plain model freezes it first, so only the method's parameters train.
On an encoder-decoder model (BART, T5) the prefix configs give the paper's three prefixes per layer
(encoder self-, decoder self- and decoder cross-attention; LoRA works too, prompt kinds are refused).
KPT (a verbalizer, not an adapter) needs its label words: ``KPTVerbalizer(masked_lm, label_words,
KPTConfig(...))`` (both re-exported here; see :mod:`peft_kernels.methods.kpt`).
:func:`trainable_state_dict` / :func:`load_trainable_state_dict` save and restore exactly the
trained tensors of any runner; :func:`method_table` measures each method on fixed reference models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .adapters import (BottleneckConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
                       PTuningV2Config)
from .methods import freeze as _freeze
from .methods.bottleneck import BottleneckAdapterModel
from .methods.freeze import trainable_parameters, trainable_summary
from .methods.kpt import KPTConfig, KPTVerbalizer
from .methods.vpt import VisualPromptTuning
from .multi_adapter import MultiAdapterModel

__all__ = [
    "BitFitConfig", "BottleneckConfig", "CONFIGS", "HeadTuningConfig", "KPTConfig", "KPTVerbalizer",
    "LayerNormTuningConfig", "LoraConfig", "TopKLayersConfig",
    "PTuningConfig", "PTuningV2Config", "PrefixTuningConfig", "PromptTuningConfig", "VPTConfig", "apply",
    "load_trainable_state_dict", "method_table", "method_table_markdown", "trainable_parameters",
    "trainable_state_dict", "trainable_summary",
]


# ---------------------------------------------------------------------------------------- configs
# LoRA, prefix tuning, P-tuning v2, prompt tuning, P-tuning and bottleneck configs live with their
# adapter kinds (peft_kernels.adapters); the ones below are methods that need no adapter bank.

@dataclass
class VPTConfig:
    """Visual prompt tuning (Jia et al. 2022) on a transformers ViT: prompt tokens after CLS.

    ``deep=False``: one prompt set at the input; ``deep=True``: one per encoder layer. The
    classifier head trains too. ``num_tasks`` prompt sets can be mixed in one batch
    (``task_index``); ``dropout`` is VPT's prompt dropout. Runs on ``soft_prompt_concat``.
    """

    num_prompts: int = 10
    deep: bool = False
    num_tasks: int = 1
    dropout: float = 0.0


@dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): train only the bias terms (and the task head if ``train_head``).

    Models without biases (Llama-style) raise a ValueError unless ``add_bias=True``, which adds
    zero-initialised biases to every ``nn.Linear`` (except the output embeddings) and trains them.
    """

    add_bias: bool = False
    train_head: bool = True


@dataclass
class LayerNormTuningConfig:
    """LayerNorm tuning (Zhao et al. 2023): train the weights/biases of every LayerNorm / RMSNorm.

    Norm modules are ``nn.LayerNorm`` / ``RMSNorm`` / ``GroupNorm`` or classes named ``*Norm*``;
    ``train_head`` also trains a ``classifier`` / ``score`` task head.
    """

    train_head: bool = True


@dataclass
class HeadTuningConfig:
    """Head tuning (linear probing): train only the output head.

    ``head_modules=None`` finds ``classifier`` / ``score`` modules, else the output embeddings
    (``get_output_embeddings()``; a head tied to the input embeddings trains both); or name them.
    """

    head_modules: Union[None, str, list] = None


@dataclass
class TopKLayersConfig:
    """Top-k layer tuning: train only the last ``k`` transformer blocks (and the head if ``train_head``).

    The head is the task head (``classifier`` / ``score``), else the output embeddings (tied to the
    input embeddings in many LMs: then both train, as one tensor).
    """

    k: int = 1
    train_head: bool = True


_MULTI = (LoraConfig, PrefixTuningConfig, PTuningV2Config, PromptTuningConfig, PTuningConfig)
CONFIGS = (*_MULTI, VPTConfig, BottleneckConfig, BitFitConfig, LayerNormTuningConfig, HeadTuningConfig,
           TopKLayersConfig)
_WRAPPERS = (MultiAdapterModel, BottleneckAdapterModel, VisualPromptTuning)


# ---------------------------------------------------------------------------------------- apply

def apply(model: nn.Module, config, name: str = "default", *, verbose: bool = False):
    """Apply one PEFT method to ``model``; returns the object that runs it (see the module docstring).

    Semantics: a plain model is frozen first; ``model`` may also be a ``MultiAdapterModel`` (for the
    LoRA / prefix / prompt / P-tuning configs) or a ``BottleneckAdapterModel`` (for
    ``BottleneckConfig``) to add adapter ``name`` next to the ones it holds. VPT keeps its tasks
    as indices (``num_tasks``), so ``name`` is not used. ``verbose`` prints the trainable counts.
    """
    if not isinstance(config, CONFIGS):
        raise TypeError(f"config must be one of {', '.join(c.__name__ for c in CONFIGS)}, got {type(config).__name__}")
    if isinstance(config, _MULTI):
        if isinstance(model, MultiAdapterModel):
            runner = model
        else:
            _plain(model, config)
            runner = MultiAdapterModel(model)  # freezes the base model
        runner.add_adapter(name, config)
        if runner.active_adapter is None:
            runner.set_adapter(name)
    elif isinstance(config, VPTConfig):
        _plain(model, config)
        runner = VisualPromptTuning(model, config.num_prompts, config.deep, num_tasks=config.num_tasks,
                                    dropout=config.dropout, verbose=False)
    elif isinstance(config, BottleneckConfig):
        if isinstance(model, BottleneckAdapterModel):
            runner = model
        else:
            _plain(model, config)
            runner = BottleneckAdapterModel(model)
        runner.add_adapter(name, config.r, reduction_factor=config.reduction_factor, placement=config.placement,
                           non_linearity=config.non_linearity, scaling=config.scaling,
                           attn_modules=config.attn_modules, ffn_modules=config.ffn_modules)
        if config.train_head:
            for head in _freeze.task_heads(runner.model).values():
                head.requires_grad_(True)
    else:
        _plain(model, config)
        if isinstance(config, BitFitConfig):
            runner = _freeze.prepare_bitfit(model, add_bias=config.add_bias, train_head=config.train_head, verbose=False)
        elif isinstance(config, LayerNormTuningConfig):
            runner = _freeze.prepare_layernorm_tuning(model, train_head=config.train_head, verbose=False)
        elif isinstance(config, TopKLayersConfig):
            runner = _freeze.prepare_topk_layers(model, config.k, train_head=config.train_head, verbose=False)
        else:
            runner = _freeze.prepare_head_tuning(model, head_modules=config.head_modules, verbose=False)
    if verbose:
        print(trainable_summary(runner))
    return runner


def _plain(model: nn.Module, config) -> None:
    if isinstance(model, _WRAPPERS):
        raise TypeError(f"{type(config).__name__} cannot be applied to a {type(model).__name__}: pass the plain "
                        "transformers model (or a MultiAdapterModel for LoRA / prefix / prompt / P-tuning configs, a "
                        "BottleneckAdapterModel for BottleneckConfig)")


# ---------------------------------------------------------------------------------------- save / load

def trainable_state_dict(runner: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of every trainable parameter of ``runner`` (detached copies)."""
    return {n: p.detach().clone() for n, p in runner.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(runner: nn.Module, state: dict[str, Tensor]) -> None:
    """Load :func:`trainable_state_dict` output into a runner made by the same ``apply`` call.

    Raises ValueError when a trainable parameter is missing from ``state``, ``state`` holds a
    name the runner does not have, or a shape differs.
    """
    params = dict(runner.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state does not fit this runner: missing {missing}, unexpected {unexpected}")
    for n, t in state.items():
        if params[n].shape != t.shape:
            raise ValueError(f"{n} is {list(t.shape)} in state but {list(params[n].shape)} in the runner")
        params[n].copy_(t)


# ---------------------------------------------------------------------------------------- reference table

def reference_models() -> dict[str, callable]:
    """Builders of the fixed, randomly initialised models the table measures on."""
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification)

    return {
        "Llama 4L/256 (GQA 8/4 heads, vocab 1000)": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)),
        "BERT 4L/256 + 2-way classifier (vocab 1000)": lambda: BertForSequenceClassification(BertConfig(
            vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=512, num_labels=2)),
        "ViT 4L/256, 32x32 images, 4x4 patches, 10 classes": lambda: ViTForImageClassification(ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, num_labels=10)),
        "BART 2+2L/256 (encoder-decoder, vocab 1000)": lambda: BartForConditionalGeneration(BartConfig(
            vocab_size=1000, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=512)),
    }


_LLAMA, _BERT, _VIT, _BART = ("Llama", "BERT", "ViT", "BART")

# method, config, reference model (prefix of a reference_models() key), what it trains, the op
TABLE = (
    ("LoRA", LoraConfig(), _LLAMA, "A [r, in], B [out, r] on every linear layer (r=8)", "multi_lora"),
    ("Prefix tuning", PrefixTuningConfig(), _LLAMA,
     "20 prefix tokens + reparameterisation MLP (folds to per-layer K/V)", "prefix_attention"),
    ("P-tuning v2", PTuningV2Config(), _LLAMA, "per-layer K/V prefixes (20 tokens)", "prefix_attention"),
    ("Prefix tuning (encoder-decoder)", PrefixTuningConfig(prefix_projection=False), _BART,
     "K/V prefixes (20 tokens) for encoder self-, decoder self- and cross-attention of every layer",
     "prefix_attention"),
    ("Prompt tuning", PromptTuningConfig(), _LLAMA, "20 input embeddings", "soft_prompt_embed+concat"),
    ("P-tuning", PTuningConfig(), _LLAMA, "20 input embeddings + MLP encoder (folds to a prompt)",
     "soft_prompt_embed+concat"),
    ("VPT shallow", VPTConfig(), _VIT, "10 prompt tokens after CLS + classifier head", "soft_prompt_concat"),
    ("VPT deep", VPTConfig(deep=True), _VIT, "10 prompt tokens per layer + classifier head", "soft_prompt_concat"),
    ("Bottleneck (Houlsby)", BottleneckConfig(), _BERT,
     "down/up projections + biases after attention and FFN (r=H/16)", "lora_shrink+expand"),
    ("Bottleneck (Pfeiffer)", BottleneckConfig(placement="pfeiffer"), _BERT,
     "down/up projections + biases after the FFN (r=H/16)", "lora_shrink+expand"),
    ("BitFit", BitFitConfig(), _BERT, "every bias + classifier head", "none"),
    ("LayerNorm tuning", LayerNormTuningConfig(), _BERT, "LayerNorm weights and biases + classifier head", "none"),
    ("LayerNorm tuning", LayerNormTuningConfig(), _LLAMA, "RMSNorm weights", "none"),
    ("Head tuning", HeadTuningConfig(), _BERT, "the classifier head", "none"),
    ("Top-k layers", TopKLayersConfig(k=1), _BERT, "the last transformer block + classifier head", "none"),
)


def method_table(methods: Optional[Sequence[str]] = None) -> list[dict]:
    """The README's method rows, measured: each method applied with its default config to a fresh reference model.

    Returns dicts with ``method``, ``trains``, ``op``, ``model``, ``trainable``, ``total`` and
    ``percent`` (trainable / total * 100, the method's own parameters included in total).
    ``methods`` restricts the rows (by method name). The global RNG state is left untouched.
    """
    builders = reference_models()
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for method, config, family, trains, op in TABLE:
            if methods is not None and method not in methods:
                continue
            model_name = next(k for k in builders if k.startswith(family))
            runner = apply(builders[model_name]().eval(), config)
            trainable, total = trainable_parameters(runner)
            rows.append(dict(method=method, trains=trains, op=op, model=model_name, trainable=trainable, total=total,
                             percent=100.0 * trainable / total))
    return rows


_OP_TEXT = {
    "none": "none (plain autograd)",
    "soft_prompt_embed+concat": "`soft_prompt_embed` (`soft_prompt_concat` from embeddings)",
    "lora_shrink+expand": "`lora_shrink` + `lora_expand`",
}


def method_table_markdown(rows: Optional[list[dict]] = None) -> str:
    """:func:`method_table` as a markdown table."""
    rows = method_table() if rows is None else rows
    lines = ["| method | trains | op | reference model | trainable params | % trainable |", "|---|---|---|---|---|---|"]
    for r in rows:
        op = _OP_TEXT.get(r["op"], f"`{r['op']}`")
        lines.append(f"| {r['method']} | {r['trains']} | {op} | {r['model']} | {r['trainable']:,d} / {r['total']:,d} "
                     f"| {r['percent']:.3f}% |")
    return "\n".join(lines)
