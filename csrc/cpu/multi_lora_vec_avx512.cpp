// Segmented LoRA micro-kernels (multi_lora_vec_kernels.inc) on at::vec's AVX512 capability
// (Vectorized<float> of 16 lanes), chosen at run time when the CPU has it. Only this file's own
// functions and at::vec's (namespace at::vec::AVX512) are compiled for AVX512.
#include "multi_lora_vec_prelude.inc"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// A target pragma does not define the ISA macros, and sleef.h declares its AVX512 functions (which
// at::vec's AVX512 headers name) only under them.
#if !defined(__AVX__)
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __AVX512F__
#else
#include <sleef.h>
#endif

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#define PK_VEC_NS vec_avx512
#include "multi_lora_vec_kernels.inc"

#pragma GCC diagnostic pop
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
