/*!
 * \file cuda_attention.cu
 * \brief The fused attention kernels (``cuda_attention.cuh``) for nvcc: one entry point per element type and head
 *        dim, ``bmc_attention_<bf16|f16>_d<16|32|64|128>(Params)``, dynamic shared memory ``Layout<D>::kBytes``. Built into
 *        a fatbin that ``libbmc_cuda_kernels`` embeds (CMakeLists.txt) and loads with the driver API.
 */
#include "cuda_attention.cuh"

#define BMC_ATTENTION_KERNEL(name, T, D)                                                             \
  extern "C" __global__ void __launch_bounds__(bmc::attention::kThreads) name(bmc::attention::Params p) { \
    BMC_DYNAMIC_SMEM(smem);                                                                          \
    bmc::attention::Attention<T, D>(p, smem);                                                        \
  }

BMC_ATTENTION_KERNEL(bmc_attention_bf16_d16, __nv_bfloat16, 16)
BMC_ATTENTION_KERNEL(bmc_attention_bf16_d32, __nv_bfloat16, 32)
BMC_ATTENTION_KERNEL(bmc_attention_bf16_d64, __nv_bfloat16, 64)
BMC_ATTENTION_KERNEL(bmc_attention_bf16_d128, __nv_bfloat16, 128)
BMC_ATTENTION_KERNEL(bmc_attention_f16_d16, __half, 16)
BMC_ATTENTION_KERNEL(bmc_attention_f16_d32, __half, 32)
BMC_ATTENTION_KERNEL(bmc_attention_f16_d64, __half, 64)
BMC_ATTENTION_KERNEL(bmc_attention_f16_d128, __half, 128)
