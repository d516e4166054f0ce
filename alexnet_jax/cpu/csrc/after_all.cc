// alexnet_after_all: its operands, returned as its results once all of them are
// computed. Each result is aliased to its operand (input_output_aliases), so the
// call moves no data; it is a scheduling edge that XLA can neither fuse nor
// duplicate: whatever reads a result waits for every operand, and reads the
// operand as it was materialised. See onednn.after_all for why the train step
// wants that.
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AfterAll(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (args.size() != rets.size())
    return ffi::Error::InvalidArgument("after_all: as many results as operands");
  for (size_t i = 0; i < args.size(); ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("after_all: operands and results must be arrays");
    if (in->size_bytes() != (*out)->size_bytes())
      return ffi::Error::InvalidArgument("after_all: each result is its operand");
    // Aliased, so the same buffer; a copy only if XLA ever gave them apart.
    if ((*out)->untyped_data() != in->untyped_data())
      std::memcpy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(alexnet_after_all, AfterAll,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());
