// BGMV over the unified pool on the CPU: every token its own adapter, rows read in place.
//
// G projections that read the same x (q/k/v; gate/up; or one alone) list their (A row, B row) pairs
// one after another, K each, grouped by token; offsets[m*(N+1) + t] is where token t's pairs
// start inside projection m's K. Adapter rows live in the pool [L, U, Dh]: a row of width H starts at
// unit `start` of layer `layer` and runs over H contiguous floats. Padding pairs (token N, the zero
// page) lie past every token's range and are never read.
//
// y[t, c_m : c_m + h_m] = sum over token t's pairs i in projection m of (x[t] . A_i) * B_i
//
// One work item is one (projection, token): it reads only that token's rows and writes only its own
// slice of y, so items run on any thread with no reduction (parallel.h). Against XLA's gathers of the
// rows into new arrays, a dot and a scatter-add, nothing is copied.
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jlora_cpu::axpy;
using jlora_cpu::dot;

ffi::Error BgmvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rows,
                    ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> a_start, ffi::Buffer<ffi::S32> b_start,
                    ffi::Buffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::F32> y,
                    ffi::Span<const int64_t> h_outs) {
  const auto xd = x.dimensions();
  const auto pd = rows.dimensions();
  const int64_t G = static_cast<int64_t>(h_outs.size());
  if (xd.size() != 2 || pd.size() != 3 || G == 0)
    return ffi::Error::InvalidArgument("bgmv: x must be [N, H_in], pool [L, U, Dh], h_outs non-empty");
  const int64_t N = xd[0], H = xd[1], L = pd[0], U = pd[1], Dh = pd[2];
  const int64_t GK = static_cast<int64_t>(a_start.element_count());
  if (GK % G || static_cast<int64_t>(offsets.element_count()) != G * (N + 1))
    return ffi::Error::InvalidArgument("bgmv: a_start must be [G*K] and offsets [G*(N+1)]");
  const int64_t K = GK / G;
  std::vector<int64_t> cols(G + 1, 0);
  for (int64_t m = 0; m < G; ++m) cols[m + 1] = cols[m] + h_outs[m];
  const int64_t width = cols[G];
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("bgmv: layer out of range");
  const float* base = rows.typed_data() + l * U * Dh;
  const float* xp = x.typed_data();
  const int32_t* a = a_start.typed_data();
  const int32_t* b = b_start.typed_data();
  const int32_t* off = offsets.typed_data();
  float* yp = y->typed_data();
  const int64_t* cp = cols.data();
  const int64_t* hp = h_outs.begin();
  auto item = [=](int64_t i) {
    const int64_t m = i / N, t = i % N;
    float* out = yp + t * width + cp[m];
    for (int64_t j = 0; j < hp[m]; ++j) out[j] = 0.f;
    auto clamp = [K](int64_t v) { return v < 0 ? 0 : (v > K ? K : v); };
    const int64_t lo = m * K + clamp(off[m * (N + 1) + t]), hi = m * K + clamp(off[m * (N + 1) + t + 1]);
    for (int64_t p = lo; p < hi; ++p) {
      if (a[p] < 0 || a[p] * Dh + H > U * Dh || b[p] < 0 || b[p] * Dh + hp[m] > U * Dh) continue;
      const float s = dot(xp + t * H, base + a[p] * Dh, H);
      axpy(s, base + b[p] * Dh, out, hp[m]);
    }
  };
  jlora_cpu::parallel_for(pool, G * N, pool.num_threads() - 1, item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bgmv, BgmvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("h_outs"));
