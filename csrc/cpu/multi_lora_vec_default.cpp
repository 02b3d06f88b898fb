// Segmented LoRA micro-kernels (multi_lora_vec_kernels.inc) on at::vec's DEFAULT capability: the
// build's baseline ISA, any CPU.
#include "multi_lora_vec_prelude.inc"

#define CPU_CAPABILITY DEFAULT
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#define PK_VEC_NS vec_default
#include "multi_lora_vec_kernels.inc"
