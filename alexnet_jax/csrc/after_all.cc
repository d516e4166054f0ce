// alexnet_after_all: a float32 0 that XLA can compute only once every operand
// is computed, and that it can neither fuse nor duplicate: a scheduling edge.
// onednn.after_all adds it to every leaf of a tree so that whatever reads the
// tree waits for all of it (see there for why the train step wants that).
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AfterAll(ffi::RemainingArgs, ffi::ResultBuffer<ffi::F32> zero) {
  *zero->typed_data() = 0.0f;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_after_all, AfterAll,
                              ffi::Ffi::Bind().RemainingArgs().Ret<ffi::Buffer<ffi::F32>>());
