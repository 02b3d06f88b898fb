// Schemas of the native soft-prompt ops and their CPU kernels (csrc/cpu/soft_prompt_forward.cpp,
// soft_prompt_backward.cpp). Arguments and results are those of the reference functions of the same
// name in peft_kernels.reference, so peft_kernels.ops registers them as its "cpp" backend directly.
#include "../soft_prompt_embed.h"
#include "direct_call.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "soft_prompt_embed_fwd(Tensor input_ids, Tensor weight, Tensor prompts, Tensor? prompt_index, "
      "Tensor? prompt_lens, int insert_at) -> Tensor");
  m.def(
      "soft_prompt_concat_fwd(Tensor embeds, Tensor prompts, Tensor? prompt_index, Tensor? prompt_lens, "
      "int insert_at, bool replace) -> Tensor");
  m.def(
      "soft_prompt_embed_bwd(Tensor grad_out, Tensor input_ids, int vocab_size, int num_prompts, "
      "Tensor? prompt_index, Tensor? prompt_lens, int insert_at, bool need_dweight) -> (Tensor, Tensor)");
  m.def(
      "soft_prompt_concat_bwd(Tensor grad_out, int num_prompts, int prompt_len, Tensor? prompt_index, "
      "Tensor? prompt_lens, int insert_at, bool replace) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("soft_prompt_embed_fwd", &peft_kernels::soft_prompt_embed_fwd_cpu);
  m.impl("soft_prompt_concat_fwd", &peft_kernels::soft_prompt_concat_fwd_cpu);
  m.impl("soft_prompt_embed_bwd", &peft_kernels::soft_prompt_embed_bwd_cpu);
  m.impl("soft_prompt_concat_bwd", &peft_kernels::soft_prompt_concat_bwd_cpu);
}

PK_DIRECT_CALL(soft_prompt_embed_fwd, peft_kernels::soft_prompt_embed_fwd_cpu);
PK_DIRECT_CALL(soft_prompt_concat_fwd, peft_kernels::soft_prompt_concat_fwd_cpu);
PK_DIRECT_CALL(soft_prompt_embed_bwd, peft_kernels::soft_prompt_embed_bwd_cpu);
PK_DIRECT_CALL(soft_prompt_concat_bwd, peft_kernels::soft_prompt_concat_bwd_cpu);
