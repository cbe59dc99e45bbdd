// y[M, P*48] = x[M, K] @ W, with W stored as column panels: panels[P, K, 48] (panel p holds columns
// 48p..48p+47 of W, row after row). A panel is one contiguous stream, so a skinny product (a decode
// step's few rows) reads each weight once, in order, with software prefetch ahead of it: close to the
// memory's read bandwidth, where a general GEMM that packs W first reaches about half of it here.
// Rows go in tiles of 8 (24 accumulators of 16 lanes); panels are shared among XLA's CPU threads
// (parallel.h).
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kWidth = 48;         // columns per panel: 3 vectors of 16 floats
constexpr int64_t kRowTile = 8;        // rows per register tile
constexpr int64_t kPrefetch = 48 * 8;  // floats ahead of the stream (8 panel rows, 1.5 KB)
typedef float v16 __attribute__((vector_size(64), aligned(4)));

template <int R>
void tile(const float* x, int64_t K, const float* panel, float* y, int64_t ldy) {
  v16 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = v16{};
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kWidth) {
    __builtin_prefetch(w + kPrefetch, 0, 3);
    __builtin_prefetch(w + kPrefetch + 16, 0, 3);
    __builtin_prefetch(w + kPrefetch + 32, 0, 3);
    const v16 w0 = *reinterpret_cast<const v16*>(w);
    const v16 w1 = *reinterpret_cast<const v16*>(w + 16);
    const v16 w2 = *reinterpret_cast<const v16*>(w + 32);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * K + k];
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
      acc[r][2] += s * w2;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) *reinterpret_cast<v16*>(y + r * ldy + 16 * j) = acc[r][j];
}

void panel(const float* x, int64_t M, int64_t K, const float* panels, int64_t p, float* y, int64_t N) {
  const float* w = panels + p * K * kWidth;
  float* yp = y + p * kWidth;
  for (int64_t r0 = 0; r0 < M; r0 += kRowTile) {
    const float* xr = x + r0 * K;
    float* yr = yp + r0 * N;
    switch (M - r0 < kRowTile ? M - r0 : kRowTile) {
      case 1: tile<1>(xr, K, w, yr, N); break;
      case 2: tile<2>(xr, K, w, yr, N); break;
      case 3: tile<3>(xr, K, w, yr, N); break;
      case 4: tile<4>(xr, K, w, yr, N); break;
      case 5: tile<5>(xr, K, w, yr, N); break;
      case 6: tile<6>(xr, K, w, yr, N); break;
      case 7: tile<7>(xr, K, w, yr, N); break;
      default: tile<8>(xr, K, w, yr, N); break;
    }
  }
}

ffi::Error PanelGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kWidth || pd[1] != xd[1])
    return ffi::Error::InvalidArgument("panel_gemm: x must be [M, K] and panels [P, K, 48]");
  const int64_t M = xd[0], K = xd[1], P = pd[0];
  const float* xp = x.typed_data();
  const float* wp = panels.typed_data();
  float* yp = y->typed_data();
  jlora_cpu::parallel_for(pool, P, pool.num_threads() - 1,
                          [=](int64_t p) { panel(xp, M, K, wp, p, yp, P * kWidth); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PanelGemm, PanelGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
