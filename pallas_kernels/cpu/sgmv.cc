// SGMV on the CPU: each sequence's prefill chunk uses one adapter, rows read in place from the
// unified pool (XLA gathers them into [B, R, H] arrays first and runs two small batched dots).
//
// x [B, T, H_in]; a_start / b_start [B, R]: the first pool unit of each of the sequence's A^T rows
// (width H_in) and B rows (width H_out, scaling folded in), padding rows at unit 0 (the zero page).
// y[b, t] = sum over r of (x[b, t] . A_r) * B_r. One work item is one sequence.
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jlora_cpu::axpy;
using jlora_cpu::dot;

ffi::Error SgmvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rows,
                    ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> a_start, ffi::Buffer<ffi::S32> b_start,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = rows.dimensions();
  const auto ad = a_start.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 3 || pd.size() != 3 || ad.size() != 2 || yd.size() != 3 || ad[0] != xd[0])
    return ffi::Error::InvalidArgument("sgmv: x [B, T, H_in], pool [L, U, Dh], a_start [B, R], y [B, T, H_out]");
  const int64_t B = xd[0], T = xd[1], H = xd[2], L = pd[0], U = pd[1], Dh = pd[2], R = ad[1], O = yd[2];
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("sgmv: layer out of range");
  const float* base = rows.typed_data() + l * U * Dh;
  const float* xp = x.typed_data();
  const int32_t* a = a_start.typed_data();
  const int32_t* bs = b_start.typed_data();
  float* yp = y->typed_data();
  auto item = [=](int64_t b) {
    float* out = yp + b * T * O;
    for (int64_t i = 0; i < T * O; ++i) out[i] = 0.f;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t ai = a[b * R + r], bi = bs[b * R + r];
      if (ai <= 0 || bi <= 0 || ai * Dh + H > U * Dh || bi * Dh + O > U * Dh) continue;  // padding
      const float* arow = base + ai * Dh;
      const float* brow = base + bi * Dh;
      for (int64_t t = 0; t < T; ++t) axpy(dot(xp + (b * T + t) * H, arow, H), brow, out + t * O, O);
    }
  };
  jlora_cpu::parallel_for(pool, B, pool.num_threads() - 1, item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sgmv, SgmvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
