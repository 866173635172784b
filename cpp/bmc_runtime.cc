/*!
 * \file bmc_runtime.cc
 * \brief bmc's native runtime library: functions registered as tvm-ffi globals (``bmc.native.*``).
 *
 * Loading the shared library (``tvm_ffi.load_module(path)`` or ``ctypes.CDLL(path, RTLD_GLOBAL)``) runs the
 * static-init block below, after which ``tvm.get_global_func("bmc.native.version")`` and friends resolve.
 * Later this file grows the MPI/NCCL collectives that ``R.ccl.*`` / ``R.call_dps_packed("bmc.*")`` route to;
 * for now it holds the skeleton: a version string, a DPS test kernel and the MPI world size.
 */
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <sstream>
#include <string>

#ifdef BMC_WITH_MPI
#include <mpi.h>
#endif

#ifndef BMC_NATIVE_VERSION
#define BMC_NATIVE_VERSION "0.0.0"
#endif

namespace bmc {
namespace native {

namespace ffi = tvm::ffi;

/*! \brief "bmc-native <version> (tvm-ffi <headers' version>, MPI <version> | no MPI)". */
ffi::String Version() {
  std::ostringstream os;
  os << "bmc-native " << BMC_NATIVE_VERSION << " (tvm-ffi " << TVM_FFI_VERSION_MAJOR << "."
     << TVM_FFI_VERSION_MINOR << "." << TVM_FFI_VERSION_PATCH << ", ";
#ifdef BMC_WITH_MPI
  os << "MPI " << MPI_VERSION << "." << MPI_SUBVERSION;
#ifdef MPICH_VERSION
  os << " MPICH " << MPICH_VERSION;
#endif
#else
  os << "no MPI";
#endif
  os << ")";
  return ffi::String(os.str());
}

namespace {

/*! \brief Checks a CPU float32 contiguous tensor argument \a what of function \a fn. */
void CheckCPUFloat32(const ffi::TensorView& t, const char* fn, const char* what) {
  DLDataType dt = t.dtype();
  if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << fn << ": " << what << " must be float32, got "
                             << ffi::DLDataTypeToString(dt);
  }
  if (t.device().device_type != kDLCPU) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be on the CPU, got device type "
                              << t.device().device_type;
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be contiguous";
  }
}

}  // namespace

/*! \brief out = x + 1, destination-passing style; a kernel to test calling native code from the VM. */
void AddOne(ffi::TensorView x, ffi::TensorView out) {
  CheckCPUFloat32(x, "bmc.native.add_one", "x");
  CheckCPUFloat32(out, "bmc.native.add_one", "out");
  if (x.numel() != out.numel()) {
    TVM_FFI_THROW(ValueError) << "bmc.native.add_one: x has " << x.numel() << " elements but out has "
                              << out.numel();
  }
  const float* src = reinterpret_cast<const float*>(static_cast<char*>(x.data_ptr()) + x.byte_offset());
  float* dst = reinterpret_cast<float*>(static_cast<char*>(out.data_ptr()) + out.byte_offset());
  for (int64_t i = 0, n = x.numel(); i < n; ++i) dst[i] = src[i] + 1.0f;
}

#ifdef BMC_WITH_MPI
/*!
 * \brief MPI_Comm_size(MPI_COMM_WORLD), or -1 when MPI is not initialized yet.
 * Initializing MPI is the Python side's job (``from mpi4py import MPI``), so this never calls MPI_Init.
 */
int64_t MPIWorldSize() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return -1;
  int size = 0;
  if (MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "bmc.native.mpi_world_size: MPI_Comm_size(MPI_COMM_WORLD) failed";
  }
  return size;
}
#endif

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("bmc.native.version", Version, "version of the native library and what it was built against")
      .def("bmc.native.add_one", AddOne, "out = x + 1 (float32, CPU, DPS); for tests");
#ifdef BMC_WITH_MPI
  refl::GlobalDef().def("bmc.native.mpi_world_size", MPIWorldSize,
                        "size of MPI_COMM_WORLD, or -1 if MPI is not initialized");
#endif
}

}  // namespace native
}  // namespace bmc
