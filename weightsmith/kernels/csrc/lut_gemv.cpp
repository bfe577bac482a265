// Lookup-table low-bit matmul (T-MAC style) for weightsmith's uniform grids, W1-W4.
//
// y[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]   (+ bias[n])
//
// The weight codes q are split into bit planes: q = sum_i 2^i * p_i with p_i in {0, 1}. For every
// quad of 4 (permuted) activations a0..a3 and every 4-bit pattern idx, a 16-entry table holds
//     T[idx] = sum_b (bit_b(idx) - 1/2) * a_b
// (centred, so |T| <= sum|a|/2: one bit of range gained over the plain subset sums). Then
//     sum_{k in quad} q_k a_k = sum_i 2^i T[p_i pattern] + (2^bits - 1)/2 * sum(a)
// and the second term folds into the zero point: zc = zero - (2^bits - 1)/2.
// Tables are quantized to int8 per token and per block of S activations (S divides the group
// size, S <= 64): lut_scale = max_quad(sum|a|/2) / 127. With passes = 2 the rounding residual of
// each entry is quantized again to int8 with lut_scale / 254 and looked up in a second pass over the
// same weights (about 15-bit tables, twice the lookups): T ~ ls * q1 + ls / 254 * q2.
//
// Packed weight layout (built in weightsmith/kernels/lut.py), rows in tiles of 64:
//     [tile][block][quad in block][bits * 32 bytes]
// A quad's chunk (64 rows x bits planes x 4 columns) holds, for each pair of planes (2p, 2p+1), 64 bytes, then for an odd bit width
// the last plane in 32 bytes. Each nibble is the 4 bits of one (row, plane) over the quad's 4
// columns (bit b = column 4*quad + b). Plane pair, byte o = 32h + j (h = 0, 1; j = 0..31): low
// nibble = row 32h + j/2, plane 2p + j%2; high nibble = row 32h + 16 + j/2, plane 2p + j%2. Odd
// plane, byte j: low nibble = row j/2 + 16 (j%2), high nibble = row 32 + j/2 + 16 (j%2).
// Scales: [tile][group][64] fp16 (the checkpoint's scale); zero points [tile][group][64] int8 as
// z2 = 2 * zero - (2^bits - 1), so zc * scale = scale * z2 / 2 (exact in float): 3 bytes per row and
// group, 0.375 bits per weight at group size 64.
//
// Inner loop: vpshufb looks up 32 (AVX2) or 64 (AVX-512) nibbles in the quad's table; vpmaddubsw
// with weights (2^i, 2^(i+1)) widens the int8 lookups of a plane pair to int16 and combines the two
// planes in one instruction, one int16 per row (natural order). Sums stay in int16 over a block
// (|acc| <= 15 * 16 * 127 = 30480 < 32767 at 4 bits), are converted to float once per block and
// scaled by scale * lut_scale. The zero term uses the float sum of each group's activations.
//
// Also in this library: 4-bit layers as nibbles for AVX-512 VNNI dot products (layout 1, gemm_dot:
// where the CPU has VNNI, the loader's choice at 4 bits), the int8 rows kernel of the output head
// (row-major, or in VNNI tiles: ws_i8_gemm_tiles), and one decode step of a Llama-shaped stack (ws_lean_step).
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int TILE = 64;
constexpr int MAX_BLOCK = 64;  // activations per table-scale block (16 quads): int16-safe at 4 bits

// ---------------------------------------------------------------- threads
// Built with -fopenmp, the library's NEEDED libgomp.so.1 resolves to the copy torch has already
// loaded (same soname), so the kernel runs on torch's own OpenMP team: no second set of threads
// spinning against torch's on the same cores. Without OpenMP, this persistent pool (spins
// briefly, then sleeps) is used instead.
#ifndef _OPENMP
class Pool {
public:
    ~Pool() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
            ++gen_;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    // Runs fn(0..n-1), fn(0) on the calling thread.
    void run(int n, const std::function<void(int)>& fn) {
        if (n <= 1) {
            fn(0);
            return;
        }
        std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
        while ((int)workers_.size() < n - 1) {
            int id = (int)workers_.size() + 1;
            workers_.emplace_back([this, id] { loop(id); });
        }
        {
            std::lock_guard<std::mutex> lk(mu_);
            fn_ = &fn;
            active_ = n;
            remaining_.store(n - 1);
            gen_atomic_.store(gen_ + 1, std::memory_order_release);
            ++gen_;
        }
        cv_.notify_all();
        fn(0);
        while (remaining_.load(std::memory_order_acquire) != 0) _mm_pause();
    }

private:
    void loop(int id) {
        long seen = 0;
        for (;;) {
            // spin a little (the next layer's call usually comes within microseconds), then sleep
            bool woke = false;
            for (int s = 0; s < 2000; ++s) {
                if (gen_atomic_.load(std::memory_order_acquire) != seen) {
                    woke = true;
                    break;
                }
                _mm_pause();
            }
            const std::function<void(int)>* fn;
            int active;
            {
                std::unique_lock<std::mutex> lk(mu_);
                if (!woke) cv_.wait(lk, [&] { return gen_ != seen; });
                if (stop_) return;
                seen = gen_;
                fn = fn_;
                active = active_;
            }
            if (id < active) {
                (*fn)(id);
                remaining_.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }
    std::vector<std::thread> workers_;
    std::mutex mu_, call_mu_;
    std::condition_variable cv_;
    const std::function<void(int)>* fn_ = nullptr;
    int active_ = 0;
    long gen_ = 0;
    std::atomic<long> gen_atomic_{0};
    std::atomic<int> remaining_{0};
    bool stop_ = false;
};

Pool& pool() {
    static Pool p;
    return p;
}
#endif

// work(id, n) on nt threads (one parallel region).
template <class Work>
void one_phase(int nt, Work& work) {
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        work(omp_get_thread_num(), omp_get_num_threads());
    } else {
        work(0, 1);
    }
#else
    pool().run(nt, [&](int id) { work(id, nt); });
#endif
}

// On nt threads: first the units 0..units-1 of per-token preparation (tables, rounded activations)
// shared out, then, after a barrier, work(id, n) — one parallel region for both.
template <class Prep, class Work>
void two_phase(int nt, int64_t units, Prep& prep, Work& work) {
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int id = omp_get_thread_num(), n = omp_get_num_threads();
            for (int64_t u = units * id / n; u < units * (id + 1) / n; ++u) prep(u);
#pragma omp barrier
            work(id, n);
        }
    } else {
        for (int64_t u = 0; u < units; ++u) prep(u);
        work(0, 1);
    }
#else
    pool().run(nt, [&](int id) {
        for (int64_t u = units * id / nt; u < units * (id + 1) / nt; ++u) prep(u);
    });
    pool().run(nt, [&](int id) { work(id, nt); });
#endif
}

// ---------------------------------------------------------------- tables
// For one token: gathered activations -> int8 tables [Kp/4][32] (16 entries, duplicated for both
// 128-bit lanes), lut scales [Kp/S], group sums [n_groups]. Plain float code, compiled without
// FMA contraction, so that the Python emulation (lut.py) reproduces it bit for bit.
// The 16 centred entries of one quad, c[idx] = ((e0 a0 + e1 a1) + e2 a2) + e3 a3 with
// e_b = +1/2 if bit b of idx is set, else -1/2 (the products are exact), quantized:
// q1 = round(c * inv), and for 2 passes q2 = round((c - q1 * ls) * inv2). Each variant below does
// the same IEEE operations in the same order, so all three (and the torch emulation) agree bit for bit.
constexpr float E[4][16] = {
    {-.5f, .5f, -.5f, .5f, -.5f, .5f, -.5f, .5f, -.5f, .5f, -.5f, .5f, -.5f, .5f, -.5f, .5f},
    {-.5f, -.5f, .5f, .5f, -.5f, -.5f, .5f, .5f, -.5f, -.5f, .5f, .5f, -.5f, -.5f, .5f, .5f},
    {-.5f, -.5f, -.5f, -.5f, .5f, .5f, .5f, .5f, -.5f, -.5f, -.5f, -.5f, .5f, .5f, .5f, .5f},
    {-.5f, -.5f, -.5f, -.5f, -.5f, -.5f, -.5f, -.5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f}};

inline float clamp127(float v) { return v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v); }

void quad_tables_scalar(const float* a, float inv, float ls, float inv2, int passes, int8_t* o, int8_t* o2) {
    for (int i = 0; i < 16; ++i) {
        const float c = ((E[0][i] * a[0] + E[1][i] * a[1]) + E[2][i] * a[2]) + E[3][i] * a[3];
        const float v = clamp127(std::nearbyint(c * inv));
        o[i] = o[16 + i] = (int8_t)v;
        if (passes == 2) {
            const float v2 = clamp127(std::nearbyint((c - v * ls) * inv2));
            o2[i] = o2[16 + i] = (int8_t)v2;
        }
    }
}

__attribute__((target("avx2,fma"))) inline __m128i pack16_avx2(__m256 lo, __m256 hi) {
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi)), 0xD8);
    return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

__attribute__((target("avx2,fma"))) void quad_tables_avx2(const float* a, float inv, float ls, float inv2, int passes,
                                                          int8_t* o, int8_t* o2) {
    const __m256 lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    __m256 c[2], v[2], v2[2];
    for (int h = 0; h < 2; ++h) {
        __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(E[0] + 8 * h), _mm256_set1_ps(a[0])),
                                 _mm256_mul_ps(_mm256_loadu_ps(E[1] + 8 * h), _mm256_set1_ps(a[1])));
        t = _mm256_add_ps(t, _mm256_mul_ps(_mm256_loadu_ps(E[2] + 8 * h), _mm256_set1_ps(a[2])));
        c[h] = _mm256_add_ps(t, _mm256_mul_ps(_mm256_loadu_ps(E[3] + 8 * h), _mm256_set1_ps(a[3])));
        v[h] = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_round_ps(_mm256_mul_ps(c[h], _mm256_set1_ps(inv)),
                                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
    const __m128i q = pack16_avx2(v[0], v[1]);
    _mm_storeu_si128((__m128i*)o, q);
    _mm_storeu_si128((__m128i*)(o + 16), q);
    if (passes == 2) {
        for (int h = 0; h < 2; ++h) {
            const __m256 r = _mm256_sub_ps(c[h], _mm256_mul_ps(v[h], _mm256_set1_ps(ls)));
            v2[h] = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_round_ps(_mm256_mul_ps(r, _mm256_set1_ps(inv2)),
                                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        }
        const __m128i q2 = pack16_avx2(v2[0], v2[1]);
        _mm_storeu_si128((__m128i*)o2, q2);
        _mm_storeu_si128((__m128i*)(o2 + 16), q2);
    }
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) void quad_tables_avx512(const float* a, float inv, float ls, float inv2,
                                                                            int passes, int8_t* o, int8_t* o2) {
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(E[0]), _mm512_set1_ps(a[0])),
                             _mm512_mul_ps(_mm512_loadu_ps(E[1]), _mm512_set1_ps(a[1])));
    t = _mm512_add_ps(t, _mm512_mul_ps(_mm512_loadu_ps(E[2]), _mm512_set1_ps(a[2])));
    const __m512 c = _mm512_add_ps(t, _mm512_mul_ps(_mm512_loadu_ps(E[3]), _mm512_set1_ps(a[3])));
    const __m512 v = _mm512_min_ps(lim, _mm512_max_ps(nlim, _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(inv)),
                                                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m128i q = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
    _mm_storeu_si128((__m128i*)o, q);
    _mm_storeu_si128((__m128i*)(o + 16), q);
    if (passes == 2) {
        const __m512 r = _mm512_sub_ps(c, _mm512_mul_ps(v, _mm512_set1_ps(ls)));
        const __m512 v2 = _mm512_min_ps(lim, _mm512_max_ps(nlim, _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(inv2)),
                                                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        const __m128i q2 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v2));
        _mm_storeu_si128((__m128i*)o2, q2);
        _mm_storeu_si128((__m128i*)(o2 + 16), q2);
    }
}

// The tables of groups g0..g1-1 of one token (groups are independent: each holds whole blocks of S):
// tab: [passes][Kp/4][32], lscale: [passes][Kp/S], asum [Kp/G]; xs the token's gathered activations.
// isa 0: scalar, 1: AVX2, 2: AVX-512.
void build_group_tables(const float* x, const int32_t* perm, int64_t Kp, int64_t G, int64_t S, int passes, int isa,
                        int64_t g0, int64_t g1, float* xs, int8_t* tab, float* lscale, float* asum) {
    const int64_t nb = Kp / S, F = S / 4, bpg = G / S;
    if (perm)
        for (int64_t k = g0 * G; k < g1 * G; ++k) xs[k] = perm[k] >= 0 ? x[perm[k]] : 0.0f;
    else  // the identity (no act-order, no padding: Kp == K)
        std::memcpy(xs + g0 * G, x + g0 * G, (g1 - g0) * G * sizeof(float));
    auto quad = isa == 2 ? quad_tables_avx512 : isa == 1 ? quad_tables_avx2 : quad_tables_scalar;
    for (int64_t g = g0; g < g1; ++g) {
        float s = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xs[k];
        asum[g] = s;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
            float mx = 0.0f;
            for (int64_t f = 0; f < F; ++f) {
                const float* a = xs + (b * F + f) * 4;
                float m = (((std::fabs(a[0]) + std::fabs(a[1])) + std::fabs(a[2])) + std::fabs(a[3])) * 0.5f;
                mx = m > mx ? m : mx;
            }
            const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
            const float ls = mx > 0.0f ? mx / 127.0f : 0.0f;
            const float inv2 = inv * 254.0f, ls2 = ls / 254.0f;
            lscale[b] = ls;
            if (passes == 2) lscale[nb + b] = ls2;
            for (int64_t f = 0; f < F; ++f)
                quad(xs + (b * F + f) * 4, inv, ls, inv2, passes, tab + (b * F + f) * 32, tab + (Kp / 4 + b * F + f) * 32);
        }
    }
}

void build_tables(const float* x, const int32_t* perm, int64_t Kp, int64_t G, int64_t S, int passes, int isa,
                  float* xs, int8_t* tab, float* lscale, float* asum) {
    build_group_tables(x, perm, Kp, G, S, passes, isa, 0, Kp / G, xs, tab, lscale, asum);
}

struct Args {
    const uint8_t* w;
    const uint16_t* scale;  // fp16; planes: [tile][group][bits][64] one scale per bit plane
    const int8_t* z2;       // uniform grid only
    const float* zc;        // planes only: [tile][group][64] the coefficient of the group's activation sum
    int64_t N, Kp, G, S;
    int bits, passes;
};

// ---------------------------------------------------------------- AVX2
// vpmaddubsw(weights u8, lookups s8) sums adjacent byte pairs into int16: with the pair (plane i,
// plane i+1) of the same row in adjacent bytes and weights (2^i, 2^(i+1)), one instruction widens
// the lookups, combines the two planes and leaves one int16 per row, in natural row order.
__attribute__((target("avx2,fma,f16c"))) inline __m256 load_half8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// o[k] -= scale * z2 / 2 * asum for the 64 rows of one group (the zero-point term).
__attribute__((target("avx2,fma,f16c"))) inline void zero_term(const uint16_t* sc, const int8_t* z2, float asum, __m256* o) {
    const __m256 s = _mm256_set1_ps(0.5f * asum);
    for (int k = 0; k < 8; ++k) {
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(z2 + 8 * k))));
        o[k] = _mm256_fnmadd_ps(_mm256_mul_ps(load_half8(sc + 8 * k), z), s, o[k]);
    }
}

__attribute__((target("avx2,fma,f16c"))) inline void flush(const __m256i acc[4], const uint16_t* sc, float ls, __m256* o) {
    const __m256 l = _mm256_set1_ps(ls);
    for (int a = 0; a < 4; ++a) {  // acc[a] = rows 16a .. 16a+15
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[a])));
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[a], 1)));
        o[2 * a] = _mm256_fmadd_ps(f0, _mm256_mul_ps(load_half8(sc + 16 * a), l), o[2 * a]);
        o[2 * a + 1] = _mm256_fmadd_ps(f1, _mm256_mul_ps(load_half8(sc + 16 * a + 8), l), o[2 * a + 1]);
    }
}

// The odd last plane of one quad (32 bytes, 64 rows): even bytes and odd bytes go to different rows.
__attribute__((target("avx2,fma"))) inline void single_avx2(__m256i t, const uint8_t* w, __m256i mask, __m256i we, __m256i wo,
                                                            __m256i acc[4]) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)w);
    const __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(v, mask));
    const __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
    acc[0] = _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(we, rl));
    acc[1] = _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(wo, rl));
    acc[2] = _mm256_add_epi16(acc[2], _mm256_maddubs_epi16(we, rh));
    acc[3] = _mm256_add_epi16(acc[3], _mm256_maddubs_epi16(wo, rh));
}

__attribute__((target("avx2,fma"))) inline __m256i pair_weights(int i, int bits) {
    // bytes (2^i, 2^(i+1)) for a plane pair; (2^i, 0) / (0, 2^i) for the odd plane (see single_avx2)
    (void)bits;
    return _mm256_set1_epi16((short)((1 << i) | ((1 << (i + 1)) << 8)));
}

// The two grids one tile loop serves (PLANES):
// - uniform (false): w = (q - zero) * scale with q = sum_i 2^i bit_i; vpmaddubsw with (2^i, 2^(i+1))
//   combines the planes of a pair into one int16 per row (|acc| <= 15 * 16 * 127 per block at 4 bits),
//   flushed with scale * lut_scale; the zero point times the group's activation sum (zero_term).
// - hierarchical linear levels, HLQ (true): w = offset + sum_i s_i bit_i, each plane with its own fp16
//   scale per row and group. The planes are not combined in int16 (their weights are not powers of
//   two): vpmaddubsw with (1, 0) and (0, 1) keeps each plane of a pair in its own int16 accumulators
//   (|acc| <= 16 * 127 per block), flushed with s_i * lut_scale; the offset and the centring go into
//   one float coefficient per row and group, zc = offset + sum_i s_i / 2, times the group's activation sum.
// NA: accumulator sets per token (one per plane for HLQ, one for the uniform grid).
template <bool PLANES>
constexpr int n_acc() { return PLANES ? 4 : 1; }

template <bool PLANES>
__attribute__((target("avx2,fma,f16c"))) inline const uint16_t* group_scales(const Args& A, int64_t tile, int64_t g) {
    const int64_t ng = A.Kp / A.G;
    return A.scale + (tile * ng + g) * (PLANES ? A.bits : 1) * TILE;
}

// The accumulated block of one pass into the outputs: per plane (HLQ) or combined (uniform).
template <bool PLANES>
__attribute__((target("avx2,fma,f16c"))) inline void flush_all(const __m256i (*acc)[4], int bits, const uint16_t* sc, float ls, __m256* o) {
    if (PLANES)
        for (int i = 0; i < bits; ++i) flush(acc[i], sc + i * TILE, ls, o);
    else
        flush(acc[0], sc, ls, o);
}

// The group's constant term: zero point (uniform) or offset + centring (HLQ), times its activation sum.
template <bool PLANES>
__attribute__((target("avx2,fma,f16c"))) inline void group_term(const Args& A, int64_t tile, int64_t g, const uint16_t* sc, float asum,
                                                              __m256* o) {
    const int64_t at = (tile * (A.Kp / A.G) + g) * TILE;
    if (PLANES) {
        const __m256 s = _mm256_set1_ps(asum);
        for (int k = 0; k < 8; ++k) o[k] = _mm256_fmadd_ps(_mm256_loadu_ps(A.zc + at + 8 * k), s, o[k]);
    } else {
        zero_term(sc, A.z2 + at, asum, o);
    }
}

// One lookup result (32 bytes: one int8 per plane of a pair, per row) into the accumulators.
template <bool PLANES>
__attribute__((target("avx2,fma"))) inline void add_pair(__m256i l, __m256i wpp, __m256i w10, __m256i w01, __m256i* ae, __m256i* ao) {
    if (PLANES) {
        *ae = _mm256_add_epi16(*ae, _mm256_maddubs_epi16(w10, l));
        *ao = _mm256_add_epi16(*ao, _mm256_maddubs_epi16(w01, l));
    } else {
        *ae = _mm256_add_epi16(*ae, _mm256_maddubs_epi16(wpp, l));
    }
}

// vpmaddubsw weights of the odd last plane's lookups (see single_avx2): byte (w, 0) for even bytes, (0, w)
// for odd bytes, w = 2^(bits-1) on the uniform grid, 1 for an HLQ plane (its own accumulators).
template <bool PLANES>
__attribute__((target("avx2"))) inline void odd_plane_weights(int bits, __m256i* we, __m256i* wo) {
    const short v = PLANES ? 1 : (short)(1 << (bits - 1));
    *we = _mm256_set1_epi16(v);
    *wo = _mm256_set1_epi16((short)(v << 8));
}

// One tile of 64 rows, one token: the 64 outputs in natural row order into out64.
template <bool PLANES>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Args& A, int64_t tile, const int8_t* tab, const float* ls,
                                                   const float* asum, float* out64) {
    constexpr int NA = n_acc<PLANES>();
    const int64_t ng = A.Kp / A.G, bpg = A.G / A.S, F = A.S / 4, nb = A.Kp / A.S;
    const int bits = A.bits, npairs = bits / 2, odd = bits & 1, qbytes = bits * 32;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i wp0 = pair_weights(0, bits), wp1 = pair_weights(2, bits);
    const __m256i w10 = _mm256_set1_epi16(1), w01 = _mm256_set1_epi16(1 << 8);
    __m256i we, wo;
    odd_plane_weights<PLANES>(bits, &we, &wo);
    __m256 o[8];
    for (int k = 0; k < 8; ++k) o[k] = _mm256_setzero_ps();
    const uint8_t* w = A.w + tile * nb * F * qbytes;
    for (int64_t g = 0; g < ng; ++g) {
        const uint16_t* sc = group_scales<PLANES>(A, tile, g);
        for (int64_t bb = 0; bb < bpg; ++bb) {
            const int64_t b = g * bpg + bb;
            for (int ps = 0; ps < A.passes; ++ps) {
                const int8_t* tb = tab + (ps * A.Kp / 4 + b * F) * 32;
                const uint8_t* wb = w;
                __m256i acc[NA][4];
                for (int i = 0; i < NA; ++i)
                    for (int a = 0; a < 4; ++a) acc[i][a] = _mm256_setzero_si256();
                for (int64_t f = 0; f < F; ++f) {
                    const __m256i t = _mm256_loadu_si256((const __m256i*)(tb + f * 32));
                    for (int pp = 0; pp < npairs; ++pp) {
                        const __m256i wpp = pp ? wp1 : wp0;
                        __m256i* ae = acc[PLANES ? 2 * pp : 0];
                        __m256i* ao = acc[PLANES ? 2 * pp + 1 : 0];
                        const __m256i va = _mm256_loadu_si256((const __m256i*)wb);
                        const __m256i vb = _mm256_loadu_si256((const __m256i*)(wb + 32));
                        add_pair<PLANES>(_mm256_shuffle_epi8(t, _mm256_and_si256(va, mask)), wpp, w10, w01, &ae[0], &ao[0]);
                        add_pair<PLANES>(_mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(va, 4), mask)), wpp, w10, w01, &ae[1], &ao[1]);
                        add_pair<PLANES>(_mm256_shuffle_epi8(t, _mm256_and_si256(vb, mask)), wpp, w10, w01, &ae[2], &ao[2]);
                        add_pair<PLANES>(_mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(vb, 4), mask)), wpp, w10, w01, &ae[3], &ao[3]);
                        wb += 64;
                    }
                    if (odd) {
                        single_avx2(t, wb, mask, we, wo, acc[PLANES ? bits - 1 : 0]);
                        wb += 32;
                    }
                }
                flush_all<PLANES>(acc, bits, sc, ls[ps * nb + b], o);
            }
            w += F * qbytes;
        }
        group_term<PLANES>(A, tile, g, sc, asum[g], o);
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out64 + 8 * k, o[k]);
}

// ---------------------------------------------------------------- AVX-512 (BW)
// add_pair on 64 bytes (two 32-byte lookup results side by side).
template <bool PLANES>
__attribute__((target("avx512f,avx512bw"))) inline void add_pair512(__m512i l, __m512i wpp, __m512i w10, __m512i w01, __m512i* ae, __m512i* ao) {
    if (PLANES) {
        *ae = _mm512_add_epi16(*ae, _mm512_maddubs_epi16(w10, l));
        *ao = _mm512_add_epi16(*ao, _mm512_maddubs_epi16(w01, l));
    } else {
        *ae = _mm512_add_epi16(*ae, _mm512_maddubs_epi16(wpp, l));
    }
}

// A plane pair's 64-byte chunk in one zmm: the quad's table broadcast to the 4 lanes; low nibbles
// give rows 0-15 (lanes 0-1) and 32-47 (lanes 2-3), high nibbles rows 16-31 and 48-63.
// NT tokens at once (prompts): the weight loads and nibble extraction are shared, the lookups not.
template <int NT, bool PLANES>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) void tile_avx512(const Args& A, int64_t tile, const int8_t* const* tab,
                                                                      const float* const* ls, const float* const* asum,
                                                                      float* const* out64) {
    constexpr int NA = n_acc<PLANES>();
    const int64_t ng = A.Kp / A.G, bpg = A.G / A.S, F = A.S / 4, nb = A.Kp / A.S;
    const int bits = A.bits, npairs = bits / 2, odd = bits & 1, qbytes = bits * 32;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m256i mask256 = _mm256_set1_epi8(0x0F);
    const __m512i wp0 = _mm512_set1_epi16((short)(1 | (2 << 8))), wp1 = _mm512_set1_epi16((short)(4 | (8 << 8)));
    const __m512i w10 = _mm512_set1_epi16(1), w01 = _mm512_set1_epi16(1 << 8);
    __m256i we, wo;
    odd_plane_weights<PLANES>(bits, &we, &wo);
    __m256 o[NT][8];
    for (int n = 0; n < NT; ++n)
        for (int k = 0; k < 8; ++k) o[n][k] = _mm256_setzero_ps();
    const uint8_t* w = A.w + tile * nb * F * qbytes;
    for (int64_t g = 0; g < ng; ++g) {
        const uint16_t* sc = group_scales<PLANES>(A, tile, g);
        for (int64_t bb = 0; bb < bpg; ++bb) {
            const int64_t b = g * bpg + bb;
            for (int ps = 0; ps < A.passes; ++ps) {
                const int8_t* tb[NT];
                for (int n = 0; n < NT; ++n) tb[n] = tab[n] + (ps * A.Kp / 4 + b * F) * 32;
                const uint8_t* wb = w;
                __m512i accl[NT][NA], acch[NT][NA];
                __m256i acc[NT][NA][4];
                for (int n = 0; n < NT; ++n)
                    for (int i = 0; i < NA; ++i) {
                        accl[n][i] = acch[n][i] = _mm512_setzero_si512();
                        for (int a = 0; a < 4; ++a) acc[n][i][a] = _mm256_setzero_si256();
                    }
                for (int64_t f = 0; f < F; ++f) {
                    __m256i t256[NT];
                    __m512i t[NT];
                    for (int n = 0; n < NT; ++n) {
                        t256[n] = _mm256_loadu_si256((const __m256i*)(tb[n] + f * 32));
                        t[n] = _mm512_broadcast_i64x4(t256[n]);
                    }
                    for (int pp = 0; pp < npairs; ++pp) {
                        const __m512i wpp = pp ? wp1 : wp0;
                        const int ie = PLANES ? 2 * pp : 0, io = PLANES ? 2 * pp + 1 : 0;
                        const __m512i v = _mm512_loadu_si512(wb);
                        const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                        for (int n = 0; n < NT; ++n) {
                            add_pair512<PLANES>(_mm512_shuffle_epi8(t[n], lo), wpp, w10, w01, &accl[n][ie], &accl[n][io]);
                            add_pair512<PLANES>(_mm512_shuffle_epi8(t[n], hi), wpp, w10, w01, &acch[n][ie], &acch[n][io]);
                        }
                        wb += 64;
                    }
                    if (odd) {
                        for (int n = 0; n < NT; ++n) single_avx2(t256[n], wb, mask256, we, wo, acc[n][PLANES ? bits - 1 : 0]);
                        wb += 32;
                    }
                }
                for (int n = 0; n < NT; ++n) {
                    for (int i = 0; i < NA; ++i) {
                        acc[n][i][0] = _mm256_add_epi16(acc[n][i][0], _mm512_castsi512_si256(accl[n][i]));
                        acc[n][i][1] = _mm256_add_epi16(acc[n][i][1], _mm512_castsi512_si256(acch[n][i]));
                        acc[n][i][2] = _mm256_add_epi16(acc[n][i][2], _mm512_extracti64x4_epi64(accl[n][i], 1));
                        acc[n][i][3] = _mm256_add_epi16(acc[n][i][3], _mm512_extracti64x4_epi64(acch[n][i], 1));
                    }
                    flush_all<PLANES>(acc[n], bits, sc, ls[n][ps * nb + b], o[n]);
                }
            }
            w += F * qbytes;
        }
        for (int n = 0; n < NT; ++n) group_term<PLANES>(A, tile, g, sc, asum[n][g], o[n]);
    }
    for (int n = 0; n < NT; ++n)
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out64[n] + 8 * k, o[n][k]);
}

// ---------------------------------------------------------------- int8 rows (the output head)
// y[m, n] = scale[n] * sum_k w[n, k] x[m, k] (+ bias[n]): int8 weights (one float scale per row),
// float32 activations, each weight widened to float in registers and multiplied in float32 — a
// weight-only kernel (a quarter of a float32 head's bytes read per token; the result is the float32
// matmul of the dequantized weight up to summation order). Rows in blocks of 4, tokens in blocks of
// up to 4 (AVX-512; AVX2: 2), so each loaded x vector serves 4 rows and each widened weight NT tokens.
constexpr int I8_ROWS = 4;

template <int NT>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void i8_rows_avx512(const int8_t* w, const float* scale, const float* bias,
                                                                        const float* x, float* y, int64_t n0, int64_t n1, int64_t N,
                                                                        int64_t K) {
    const int64_t kv = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - kv)) - 1u);
    for (int64_t n = n0; n < n1; n += I8_ROWS) {
        const int rows = n1 - n < I8_ROWS ? (int)(n1 - n) : I8_ROWS;
        __m512 acc[I8_ROWS][NT];
        for (int r = 0; r < I8_ROWS; ++r)
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const bool full = k < kv;
            __m512 xv[NT];
            for (int t = 0; t < NT; ++t) xv[t] = full ? _mm512_loadu_ps(x + t * K + k) : _mm512_maskz_loadu_ps(tail, x + t * K + k);
            for (int r = 0; r < I8_ROWS; ++r) {
                if (r >= rows) break;
                const int8_t* wr = w + (n + r) * K + k;
                const __m128i b = full ? _mm_loadu_si128((const __m128i*)wr) : _mm_maskz_loadu_epi8(tail, wr);
                const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wf, xv[t], acc[r][t]);
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int t = 0; t < NT; ++t) {
                const float v = _mm512_reduce_add_ps(acc[r][t]) * scale[n + r];
                y[t * N + n + r] = bias ? v + bias[n + r] : v;
            }
    }
}

template <int NT>
__attribute__((target("avx2,fma"))) void i8_rows_avx2(const int8_t* w, const float* scale, const float* bias, const float* x, float* y,
                                                       int64_t n0, int64_t n1, int64_t N, int64_t K) {
    const int64_t kv = K / 8 * 8;
    for (int64_t n = n0; n < n1; n += I8_ROWS) {
        const int rows = n1 - n < I8_ROWS ? (int)(n1 - n) : I8_ROWS;
        __m256 acc[I8_ROWS][NT];
        for (int r = 0; r < I8_ROWS; ++r)
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
        for (int64_t k = 0; k < kv; k += 8) {
            __m256 xv[NT];
            for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
            for (int r = 0; r < rows; ++r) {
                int64_t b8;
                std::memcpy(&b8, w + (n + r) * K + k, 8);
                const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b8)));
                for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(wf, xv[t], acc[r][t]);
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int t = 0; t < NT; ++t) {
                alignas(32) float h[8];
                _mm256_store_ps(h, acc[r][t]);
                float v = ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));
                for (int64_t k = kv; k < K; ++k) v += (float)w[(n + r) * K + k] * x[t * K + k];
                v *= scale[n + r];
                y[t * N + n + r] = bias ? v + bias[n + r] : v;
            }
    }
}

// Rows [n0, n1) of every token: the widest token block that fits, then the rest.
void i8_rows(int isa, const int8_t* w, const float* scale, const float* bias, const float* x, float* y, int64_t M, int64_t n0,
             int64_t n1, int64_t N, int64_t K) {
    for (int64_t m = 0; m < M;) {
        const float* xm = x + m * K;
        float* ym = y + m * N;
        if (isa == 2 && M - m >= 4) {
            i8_rows_avx512<4>(w, scale, bias, xm, ym, n0, n1, N, K);
            m += 4;
        } else if (isa == 2 && M - m >= 2) {
            i8_rows_avx512<2>(w, scale, bias, xm, ym, n0, n1, N, K);
            m += 2;
        } else if (isa == 2) {
            i8_rows_avx512<1>(w, scale, bias, xm, ym, n0, n1, N, K);
            m += 1;
        } else if (M - m >= 2) {
            i8_rows_avx2<2>(w, scale, bias, xm, ym, n0, n1, N, K);
            m += 2;
        } else {
            i8_rows_avx2<1>(w, scale, bias, xm, ym, n0, n1, N, K);
            m += 1;
        }
    }
}

// One token (M = 1) through int8 rows with int8 activations, AVX-512 VNNI: x is rounded twice to int8,
// x ≈ s1 q1 + s2 q2 (q2 the rounding residual on a 254× finer step, so |x − s1 q1 − s2 q2| ≤ s2 / 2 =
// absmax(x) / 64516), and each row's two integer dot products are `vpdpbusd` sums of 64 bytes per
// instruction. `vpdpbusd` wants one operand unsigned: the weights go in as w + 128 (one xor with 0x80
// in the register), and the offset comes out through the token's code sums, 128 Σq, computed once.
// Four rows at a time, their 16-lane sums reduced together; exact int32 sums (K ≤ I8_VNNI_MAX_K).
constexpr int64_t I8_VNNI_MAX_K = 32768;
// software prefetch of the next 4-row tile (rows ahead): measured a little faster than none on Zen 4
#ifndef WS_PF
#define WS_PF 4
#endif

bool have_vnni() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

// max |x[k]| of n values into *amax; false if any is not finite (a NaN fails every comparison: checked on its own)
bool finite_absmax(const float* x, int64_t n, float* amax) {
    float m = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < n; ++k) {
        m = std::fabs(x[k]) > m ? std::fabs(x[k]) : m;
        finite = finite && std::isfinite(x[k]);
    }
    *amax = m;
    return finite;
}

// a1, a2: K bytes rounded up to 64, the tail zero (masked weight loads zero it anyway); t1, t2: Σ a1, Σ a2.
bool i8_quantize_token(const float* x, int64_t K, int8_t* a1, int8_t* a2, float* s1, float* s2, int64_t* t1, int64_t* t2) {
    float amax;
    if (!finite_absmax(x, K, &amax)) return false;
    *s1 = amax > 0.0f ? amax / 127.0f : 1.0f;
    *s2 = *s1 / 254.0f;
    const float i1 = 1.0f / *s1, i2 = 1.0f / *s2;
    int64_t u1 = 0, u2 = 0;
    for (int64_t k = 0; k < K; ++k) {
        const float q1 = clamp127(std::nearbyint(x[k] * i1));
        const float q2 = clamp127(std::nearbyint((x[k] - q1 * *s1) * i2));
        a1[k] = (int8_t)q1;
        a2[k] = (int8_t)q2;
        u1 += (int64_t)q1;
        u2 += (int64_t)q2;
    }
    *t1 = u1;
    *t2 = u2;
    return true;
}

// The four 16-lane int32 sums a, b, c, d reduced to one int32 each: [Σa, Σb, Σc, Σd].
__attribute__((target("avx512f,avx512bw"))) inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));  // per 128-bit lane: a a b b (pairs)
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));  // per lane: a b c d
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void i8_rows_vnni(const int8_t* w, const float* scale, const float* bias,
                                                                         const int8_t* a1, const int8_t* a2, float s1, float s2,
                                                                         int64_t t1, int64_t t2, float* y, int64_t n0, int64_t n1,
                                                                         int64_t K) {
    const int64_t kv = K / 64 * 64;
    const __mmask64 tail = K > kv ? (~0ULL >> (64 - (K - kv))) : 0;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int64_t off1 = 128 * t1, off2 = 128 * t2;
    for (int64_t n = n0; n < n1; n += 4) {
        const int rows = n1 - n < 4 ? (int)(n1 - n) : 4;
        __m512i c1[4], c2[4];
        for (int r = 0; r < 4; ++r) c1[r] = c2[r] = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 64) {
            const __m512i x1 = _mm512_loadu_si512(a1 + k), x2 = _mm512_loadu_si512(a2 + k);
            for (int r = 0; r < rows; ++r) {
                const int8_t* wr = w + (n + r) * K + k;
                // the masked tail loads zeros, which the xor makes 128: their activations are 0
                const __m512i b = _mm512_xor_si512(k < kv ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(tail, wr), flip);
                _mm_prefetch((const char*)(wr + WS_PF * K), _MM_HINT_T0);
                c1[r] = _mm512_dpbusd_epi32(c1[r], b, x1);
                c2[r] = _mm512_dpbusd_epi32(c2[r], b, x2);
            }
        }
        alignas(16) int32_t d1[4], d2[4];
        _mm_store_si128((__m128i*)d1, reduce4(c1[0], c1[1], c1[2], c1[3]));
        _mm_store_si128((__m128i*)d2, reduce4(c2[0], c2[1], c2[2], c2[3]));
        for (int r = 0; r < rows; ++r) {
            const double v1 = (double)((int64_t)d1[r] - off1), v2 = (double)((int64_t)d2[r] - off2);
            const float v = (float)(v1 * s1 + v2 * s2) * scale[n + r];
            y[n + r] = bias ? v + bias[n + r] : v;
        }
    }
}

// The int8 rows in tiles for VNNI (the head on a VNNI CPU, any number of tokens): the codes stored
// unsigned (w + 128), [tile of 64 rows][K/4 column quads][4 row blocks of 16][16 rows × 4 bytes], so
// that one zmm holds 16 rows × 4 columns and `vpdpbusd` against the 4 activations broadcast leaves
// each row's sum in its own lane (no reductions), the whole matrix read as one sequential stream.
// Activations rounded twice to int8 per token as above; the +128 taken out through 128 Σq. No software
// prefetch: on Zen 4 the hardware prefetcher alone was faster on this one stream (49152 × 2048, 1 token:
// ~4.4 vs 5.2-7.4 ms at 1 thread, ~2.8 vs 3.3-4.3 ms at 2, prefetching 1-16 KB ahead).
template <int NT, int RB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void i8_tile_vnni(const uint8_t* wt, int64_t k4, const int8_t* const* a1,
                                                                                const int8_t* const* a2, const int32_t* off1,
                                                                                const int32_t* off2, const float* s1, const float* s2,
                                                                                float* const* out64) {
    for (int rb0 = 0; rb0 < 4; rb0 += RB) {
        __m512i c1[NT][RB], c2[NT][RB];
        for (int n = 0; n < NT; ++n)
            for (int r = 0; r < RB; ++r) c1[n][r] = c2[n][r] = _mm512_setzero_si512();
        const uint8_t* w = wt + rb0 * 64;
        for (int64_t q = 0; q < k4; ++q) {
            __m512i v[RB];
            for (int r = 0; r < RB; ++r) v[r] = _mm512_loadu_si512(w + q * 256 + r * 64);
            for (int n = 0; n < NT; ++n) {
                int32_t u1, u2;
                std::memcpy(&u1, a1[n] + 4 * q, 4);
                std::memcpy(&u2, a2[n] + 4 * q, 4);
                const __m512i b1 = _mm512_set1_epi32(u1), b2 = _mm512_set1_epi32(u2);
                for (int r = 0; r < RB; ++r) {
                    c1[n][r] = _mm512_dpbusd_epi32(c1[n][r], v[r], b1);
                    c2[n][r] = _mm512_dpbusd_epi32(c2[n][r], v[r], b2);
                }
            }
        }
        for (int n = 0; n < NT; ++n)
            for (int r = 0; r < RB; ++r) {
                const __m512 d1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(c1[n][r], _mm512_set1_epi32(off1[n])));
                const __m512 d2 = _mm512_cvtepi32_ps(_mm512_sub_epi32(c2[n][r], _mm512_set1_epi32(off2[n])));
                _mm512_storeu_ps(out64[n] + 16 * (rb0 + r), _mm512_add_ps(_mm512_mul_ps(d1, _mm512_set1_ps(s1[n])), _mm512_mul_ps(d2, _mm512_set1_ps(s2[n]))));
            }
    }
}

// ---------------------------------------------------------------- 4-bit codes on VNNI integer dot products (layout 1)
// The T-MAC tables pay off below 4 bits; at 4 bits a table lookup per plane pair costs more than
// multiplying the code itself. Layout 1 keeps each row's 4-bit codes as nibbles (the same bytes as
// the bit planes, 0.5 per weight) so that `vpdpbusd` multiplies them by int8 activations directly:
//     [tile of 64 rows][chunk c of 8 packed columns][row block rb of 16 rows][64 bytes]
// byte 4i + j of a row block (row 16 rb + i, j = 0..3): low nibble = the code at column 8c + j,
// high nibble = the code at column 8c + 4 + j. One zmm = 16 rows × 8 columns: its low nibbles
// (v & 0x0F) against the 4 activations 8c..8c+3 broadcast to every lane, its high nibbles, left in
// place (v & 0xF0, 16× the code), against 8c+4..8c+7 — no shift in the loop; the high sum is
// divided by 16 (exactly) once per group. Activations are rounded to int8 once per token and group,
// x ≈ s1 q1 (passes = 2: + s2 q2, the residual on a 254× finer step, as the int8 rows kernel does);
// the zero point goes through the group's integer code sum Σq, so the kernel computes exactly
//     y[n] = Σ_g scale[n,g] Σ_p s_p[g] (Σ_{k∈g} q[n,k] q_p[k] − zero[n,g] Σ_{k∈g} q_p[k])
// in integers up to the float product per group: |y − x·w| ≤ Σ_g (s_last[g] / 2) Σ_{k∈g} |w[n,k]|.
// int32 sums are exact for G ≤ DOT_MAX_G (16 × 15 × 127 × 4 per byte quad per chunk).
constexpr int64_t DOT_MAX_G = 65536;

struct DotAct {  // one token's rounded activations: [P][Kp] int8 codes, [P][ng] scales and code sums
    const int8_t* q[2];
    const float* s[2];
    const int32_t* qs[2];
};

// Groups g0..g1-1 of one token: x gathered through perm (null: identity; -1: padding, read as 0) and
// rounded per group of G into q1 (and q2), s1 (s2), qs1 (qs2), indexed by packed column and group.
// Returns false for a non-finite activation.
bool dot_quantize_groups(const float* x, const int32_t* perm, int64_t G, int passes, int64_t g0, int64_t g1, int8_t* q1, int8_t* q2,
                         float* s1, float* s2, int32_t* qs1, int32_t* qs2) {
    thread_local std::vector<float> buf;
    buf.resize((size_t)G);
    float* xg = buf.data();
    for (int64_t g = g0; g < g1; ++g) {
        for (int64_t k = 0; k < G; ++k) {
            const int64_t c = g * G + k;
            xg[k] = perm ? (perm[c] >= 0 ? x[perm[c]] : 0.0f) : x[c];
        }
        float amax;
        if (!finite_absmax(xg, G, &amax)) return false;
        const float a = amax > 0.0f ? amax / 127.0f : 1.0f, b = a / 254.0f;
        const float ia = 1.0f / a, ib = 1.0f / b;
        int32_t t1 = 0, t2 = 0;
        for (int64_t k = 0; k < G; ++k) {
            const float v1 = clamp127(std::nearbyint(xg[k] * ia));
            q1[g * G + k] = (int8_t)v1;
            t1 += (int32_t)v1;
            if (passes == 2) {
                const float v2 = clamp127(std::nearbyint((xg[k] - v1 * a) * ib));
                q2[g * G + k] = (int8_t)v2;
                t2 += (int32_t)v2;
            }
        }
        s1[g] = a;
        qs1[g] = t1;
        if (passes == 2) {
            s2[g] = b;
            qs2[g] = t2;
        }
    }
    return true;
}

// One tile of 64 rows for NT tokens: out64[n][64] (natural row order). RB row blocks of 16 per sweep
// over the tile's weights (64 / (16 RB) sweeps), so that the int32 accumulators fit the registers.
template <int NT, int P, int RB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma"))) void tile_dot4(const uint8_t* w, const uint16_t* sc,
                                                                                      const int8_t* z2, int64_t ng, int64_t G,
                                                                                      const DotAct* act, float* const* out64) {
    const int64_t cpg = G / 8;
    const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8((char)0xF0);
    for (int n = 0; n < NT; ++n)
        for (int r = 0; r < TILE; ++r) out64[n][r] = 0.0f;
    for (int rb0 = 0; rb0 < 4; rb0 += RB) {
        for (int64_t g = 0; g < ng; ++g) {
            __m512i aL[NT][P][RB], aH[NT][P][RB];
            for (int n = 0; n < NT; ++n)
                for (int p = 0; p < P; ++p)
                    for (int r = 0; r < RB; ++r) aL[n][p][r] = aH[n][p][r] = _mm512_setzero_si512();
            const uint8_t* wg = w + g * cpg * 256 + rb0 * 64;
            for (int64_t c = 0; c < cpg; ++c) {
                const uint8_t* wc = wg + c * 256;
                __m512i lo[RB], hi[RB];
                for (int r = 0; r < RB; ++r) {
                    const __m512i v = _mm512_loadu_si512(wc + r * 64);
                    lo[r] = _mm512_and_si512(v, m0f);
                    hi[r] = _mm512_and_si512(v, mf0);
                }
                const int64_t k = g * G + 8 * c;
                for (int n = 0; n < NT; ++n)
                    for (int p = 0; p < P; ++p) {
                        int32_t xa, xb;
                        std::memcpy(&xa, act[n].q[p] + k, 4);
                        std::memcpy(&xb, act[n].q[p] + k + 4, 4);
                        const __m512i va = _mm512_set1_epi32(xa), vb = _mm512_set1_epi32(xb);
                        for (int r = 0; r < RB; ++r) {
                            aL[n][p][r] = _mm512_dpbusd_epi32(aL[n][p][r], lo[r], va);
                            aH[n][p][r] = _mm512_dpbusd_epi32(aH[n][p][r], hi[r], vb);
                        }
                    }
            }
            for (int r = 0; r < RB; ++r) {
                const int64_t o = g * TILE + 16 * (rb0 + r);
                const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + o)));
                // zero = (z2 + 15) / 2, exact in float
                const __m512 zf = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(z2 + o)))),
                                                              _mm512_set1_ps(15.0f)),
                                                _mm512_set1_ps(0.5f));
                for (int n = 0; n < NT; ++n) {
                    __m512 t = _mm512_setzero_ps();
                    for (int p = 0; p < P; ++p) {
                        const __m512i d = _mm512_add_epi32(aL[n][p][r], _mm512_srai_epi32(aH[n][p][r], 4));
                        const __m512 dz = _mm512_sub_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(zf, _mm512_set1_ps((float)act[n].qs[p][g])));
                        t = _mm512_add_ps(t, _mm512_mul_ps(dz, _mm512_set1_ps(act[n].s[p][g])));
                    }
                    float* op = out64[n] + 16 * (rb0 + r);
                    _mm512_storeu_ps(op, _mm512_add_ps(_mm512_loadu_ps(op), _mm512_mul_ps(s, t)));
                }
            }
        }
    }
}

// y[M, N] = x[M, K] times a layout-1 layer (4-bit uniform grid), + bias. Non-finite activations give
// NaN outputs for that token. Returns 0, -1 bad arguments, -2 no AVX-512 VNNI on this CPU.
static int gemm_dot(const uint8_t* w, const uint16_t* scale, const int8_t* z2, const int32_t* perm, const float* bias, const float* x,
                    float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int bits, int passes, int threads) {
    if (passes < 1 || passes > 2 || bits != 4 || G <= 0 || G % 8 || G > DOT_MAX_G || Kp % G || M < 0 || N < 0 || K < 0 || K > Kp ||
        (!perm && K != Kp))
        return -1;
    if (!have_vnni()) return -2;
    if (M == 0 || N == 0) return 0;
    const int64_t ng = Kp / G;
    thread_local std::vector<float> fs;
    thread_local std::vector<int8_t> qa;
    thread_local std::vector<int32_t> qsum;
    qa.resize((size_t)M * 2 * Kp);
    fs.resize((size_t)M * 2 * ng);
    qsum.resize((size_t)M * 2 * ng);
    std::vector<DotAct> act((size_t)M);
    for (int64_t m = 0; m < M; ++m) {
        int8_t* q = qa.data() + m * 2 * Kp;
        float* s = fs.data() + m * 2 * ng;
        int32_t* qs = qsum.data() + m * 2 * ng;
        act[m] = DotAct{{q, q + Kp}, {s, s + ng}, {qs, qs + ng}};
    }
    // the activations of unit u = (token, slice of groups) are rounded by the threads before the tiles
    const int64_t gsl = ng < 8 ? ng : 8, units = M * gsl;
    std::vector<char> bad((size_t)units, 0);
    char* badp = bad.data();  // the workers read these, not their own (empty) thread_local copies
    DotAct* actw = act.data();
    auto quant = [&](int64_t u) {
        const int64_t m = u / gsl, j = u % gsl;
        DotAct& A = actw[m];
        badp[u] = !dot_quantize_groups(x + m * K, perm, G, passes, ng * j / gsl, ng * (j + 1) / gsl, (int8_t*)A.q[0], (int8_t*)A.q[1],
                                       (float*)A.s[0], (float*)A.s[1], (int32_t*)A.qs[0], (int32_t*)A.qs[1]);
    };
    auto tok_ok = [&](int64_t m) {
        for (int64_t j = 0; j < gsl; ++j)
            if (badp[m * gsl + j]) return false;
        return true;
    };
    const DotAct* actp = act.data();
    const int64_t ntiles = (N + TILE - 1) / TILE;
    int nt = threads < 1 ? 1 : threads;
    if (nt > ntiles) nt = (int)ntiles;
    constexpr int NTMAX = 4;
    auto work = [&](int id, int n) {
        const int64_t t0 = ntiles * id / n, t1 = ntiles * (id + 1) / n;
        alignas(64) float out[NTMAX][TILE];
        float* op[NTMAX] = {out[0], out[1], out[2], out[3]};
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t rows = N - t * TILE < TILE ? N - t * TILE : TILE;
            const uint8_t* wt = w + t * (Kp / 8) * 256;
            const uint16_t* st = scale + t * ng * TILE;
            const int8_t* zt = z2 + t * ng * TILE;
            for (int64_t m = 0; m < M;) {
                const int here = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
                const DotAct* a = actp + m;
                if (passes == 1) {
                    if (here == 4) tile_dot4<4, 1, 2>(wt, st, zt, ng, G, a, op);
                    else if (here == 2) tile_dot4<2, 1, 4>(wt, st, zt, ng, G, a, op);
                    else tile_dot4<1, 1, 4>(wt, st, zt, ng, G, a, op);
                } else {
                    if (here == 4) tile_dot4<4, 2, 1>(wt, st, zt, ng, G, a, op);
                    else if (here == 2) tile_dot4<2, 2, 2>(wt, st, zt, ng, G, a, op);
                    else tile_dot4<1, 2, 4>(wt, st, zt, ng, G, a, op);
                }
                for (int j = 0; j < here; ++j) {
                    float* yo = y + (m + j) * N + t * TILE;
                    const bool ok = tok_ok(m + j);
                    for (int64_t r = 0; r < rows; ++r)
                        yo[r] = ok ? (bias ? out[j][r] + bias[t * TILE + r] : out[j][r]) : NAN;
                }
                m += here;
            }
        }
    };
    two_phase(nt, units, quant, work);
    return 0;
}

int best_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
    return 0;
}

struct Scratch {
    std::vector<float> xs, ls, asum;
    std::vector<int8_t> tab;
};

}  // namespace

extern "C" {

int ws_lut_abi_version() { return 14; }

// 1 when built with OpenMP (the kernel shares torch's OpenMP threads), 0 with its own thread pool.
int ws_lut_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// The address of the OpenMP runtime's omp_get_num_threads this library resolved to (null without
// OpenMP): tells which libgomp the kernel runs on.
const void* ws_lut_omp_symbol() {
#ifdef _OPENMP
    return (const void*)&omp_get_num_threads;
#else
    return nullptr;
#endif
}

// 0: no supported instruction set (the caller must use the dequantize path), 1: AVX2, 2: AVX-512BW.
int ws_lut_isa() { return best_isa(); }

// The tables of one token, for the Python emulation tests: tab [passes][Kp/4][32] int8,
// ls [passes][Kp/S], asum [Kp/G].
// isa: 0 scalar, 1 AVX2, 2 AVX-512, -1 the best this CPU has.
void ws_lut_tables(const float* x, const int32_t* perm, int64_t Kp, int64_t G, int64_t S, int passes, int isa,
                   int8_t* tab, float* ls, float* asum) {
    std::vector<float> xs(Kp);
    const int have = best_isa();
    build_tables(x, perm, Kp, G, S, passes, isa < 0 || isa > have ? have : isa, xs.data(), tab, ls, asum);
}

// y[M, N] = x[M, K] (gathered through perm [Kp]; null: the identity, Kp == K) times the packed weight, + bias (may be null).
// Returns 0 on success, negative on bad arguments / unsupported isa.
static int gemm(const uint8_t* w, const uint16_t* scale, const int8_t* z2, const float* zcoef, const int32_t* perm, const float* bias,
                const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int64_t S, int bits,
                int passes, int threads, int isa) {
    if (passes < 1 || passes > 2 || bits < 1 || bits > 4 || G <= 0 || S <= 0 || S % 4 || G % S || Kp % G || S > MAX_BLOCK || M < 0 || N < 0)
        return -1;
    const int have = best_isa();
    if (isa < 0) isa = have;
    if (isa == 0 || isa > have) return -2;
    if (M == 0 || N == 0) return 0;
    const int64_t nq = Kp / 4, nb = Kp / S, ng = Kp / G;
    thread_local Scratch s;
    s.xs.resize((size_t)M * Kp);
    s.tab.resize((size_t)M * passes * nq * 32);
    s.ls.resize((size_t)M * passes * nb);
    s.asum.resize((size_t)M * ng);
    // the tables of unit u = (token, slice of groups): the threads share them out before the tiles
    // (bench/bench_kernel_isa.py's machine, 2 threads, 1 token: 576×576 13.0 -> 11.7 µs, 2048×5632
    // 136.7 -> 132.3 µs; the rest of the gap to 2× is the parallel region's own start and end)
    const int64_t gslices = ng < 8 ? ng : 8, units = M * gslices;
    float* xs_all = s.xs.data();
    int8_t* tab_all = s.tab.data();
    float* ls_all = s.ls.data();
    float* asum_all = s.asum.data();
    auto tables = [&](int64_t u) {
        const int64_t m = u / gslices, j = u % gslices;
        build_group_tables(x + m * K, perm, Kp, G, S, passes, isa, ng * j / gslices, ng * (j + 1) / gslices, xs_all + m * Kp,
                           tab_all + m * passes * nq * 32, ls_all + m * passes * nb, asum_all + m * ng);
    };
    const Args A{w, scale, z2, zcoef, N, Kp, G, S, bits, passes};
    const bool planes = zcoef != nullptr;
    const int64_t ntiles = (N + TILE - 1) / TILE;
    int nt = threads < 1 ? 1 : threads;
    if (nt > ntiles) nt = (int)ntiles;
    const int8_t* tab = s.tab.data();
    const float* ls = s.ls.data();
    const float* asum = s.asum.data();
    constexpr int NT = 4;  // at most this many tokens per AVX-512 tile call (4, then 2, then 1)
    auto work = [&](int id, int n) {
        const int64_t t0 = ntiles * id / n, t1 = ntiles * (id + 1) / n;
        alignas(64) float out64[NT][TILE];
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t rows = N - t * TILE < TILE ? N - t * TILE : TILE;
            for (int64_t m = 0; m < M;) {
                // HLQ keeps 4 planes' accumulators per token: at most 2 tokens per call fit the 32 zmm registers
                const int nt_here = isa != 2 ? 1 : M - m >= 4 && !planes ? 4 : M - m >= 2 ? 2 : 1;
                const int8_t* tp[NT];
                const float* lp[NT];
                const float* ap[NT];
                float* op[NT];
                for (int j = 0; j < nt_here; ++j) {
                    tp[j] = tab + (m + j) * passes * nq * 32;
                    lp[j] = ls + (m + j) * passes * nb;
                    ap[j] = asum + (m + j) * ng;
                    op[j] = out64[j];
                }
                if (planes && isa == 2 && nt_here == 2)
                    tile_avx512<2, true>(A, t, tp, lp, ap, op);
                else if (planes && isa == 2)
                    tile_avx512<1, true>(A, t, tp, lp, ap, op);
                else if (planes)
                    tile_avx2<true>(A, t, tp[0], lp[0], ap[0], out64[0]);
                else if (isa == 2 && nt_here == 4)
                    tile_avx512<4, false>(A, t, tp, lp, ap, op);
                else if (isa == 2 && nt_here == 2)
                    tile_avx512<2, false>(A, t, tp, lp, ap, op);
                else if (isa == 2)
                    tile_avx512<1, false>(A, t, tp, lp, ap, op);
                else
                    tile_avx2<false>(A, t, tp[0], lp[0], ap[0], out64[0]);
                for (int j = 0; j < nt_here; ++j) {
                    float* yo = y + (m + j) * N + t * TILE;
                    if (bias)
                        for (int64_t r = 0; r < rows; ++r) yo[r] = out64[j][r] + bias[t * TILE + r];
                    else
                        std::memcpy(yo, out64[j], rows * sizeof(float));
                }
                m += nt_here;
            }
        }
    };
    two_phase(nt, units, tables, work);
    return 0;
}

int ws_lut_gemm(const uint8_t* w, const uint16_t* scale, const int8_t* z2, const int32_t* perm, const float* bias,
                const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int64_t S, int bits,
                int passes, int threads, int isa) {
    return gemm(w, scale, z2, nullptr, perm, bias, x, y, M, N, K, Kp, G, S, bits, passes, threads, isa);
}

// HLQ layers: plane scales fp16 [tile][group][bits][64], zc float [tile][group][64] (see tile_avx2<true>).
int ws_lut_gemm_planes(const uint8_t* w, const uint16_t* plane_scale, const float* zc, const int32_t* perm, const float* bias,
                       const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int64_t S, int bits,
                       int passes, int threads, int isa) {
    if (zc == nullptr) return -1;
    return gemm(w, plane_scale, nullptr, zc, perm, bias, x, y, M, N, K, Kp, G, S, bits, passes, threads, isa);
}

// Layout-1 layers (4-bit codes as nibbles for VNNI dot products, see gemm_dot): the same arguments as
// ws_lut_gemm (S is not used). Returns 0, -1 bad arguments, -2 without AVX-512 VNNI.
int ws_lut_gemm_dot(const uint8_t* w, const uint16_t* scale, const int8_t* z2, const int32_t* perm, const float* bias,
                    const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int64_t S, int bits,
                    int passes, int threads, int isa) {
    (void)S;
    if (isa == 1) return -2;  // an AVX2-only request: this layout has no AVX2 path
    return gemm_dot(w, scale, z2, perm, bias, x, y, M, N, K, Kp, G, bits, passes, threads);
}

// 1 where layout-1 layers run on this CPU (AVX-512 VNNI).
int ws_lut_dot_supported() { return have_vnni() ? 1 : 0; }

// The int8 rows kernel (the output head): w [N][K] int8, scale [N], bias [N] or null, x [M][K], y [M][N].
// Rows are split between the threads in blocks of 64. Returns 0, -1 on bad arguments, -2 for an isa this CPU lacks.
int ws_i8_gemm(const int8_t* w, const float* scale, const float* bias, const float* x, float* y, int64_t M, int64_t N, int64_t K,
               int threads, int isa, int act8) {
    if (M < 0 || N < 0 || K < 1 || !w || !scale || !x || !y) return -1;
    const int have = best_isa();
    if (isa < 0) isa = have;
    if (isa == 0 || isa > have) return -2;
    if (M == 0 || N == 0) return 0;
    // act8: one token with int8 activations on VNNI where the CPU has it (else, or for non-finite x, weight-only)
    std::vector<int8_t> a1, a2;
    float s1 = 0.0f, s2 = 0.0f;
    int64_t t1 = 0, t2 = 0;
    bool vnni = act8 && M == 1 && isa == 2 && K <= I8_VNNI_MAX_K && have_vnni();
    if (vnni) {
        const int64_t kp = (K + 63) / 64 * 64;
        a1.assign(kp, 0);
        a2.assign(kp, 0);
        vnni = i8_quantize_token(x, K, a1.data(), a2.data(), &s1, &s2, &t1, &t2);
    }
    const int64_t chunks = (N + 63) / 64;
    int nt = threads < 1 ? 1 : threads;
    if (nt > chunks) nt = (int)chunks;
    auto work = [&](int id, int n) {
        const int64_t c0 = chunks * id / n, c1 = chunks * (id + 1) / n;
        const int64_t r1 = 64 * c1 < N ? 64 * c1 : N;
        if (64 * c0 >= r1) return;
        if (vnni)
            i8_rows_vnni(w, scale, bias, a1.data(), a2.data(), s1, s2, t1, t2, y, 64 * c0, r1, K);
        else
            i8_rows(isa, w, scale, bias, x, y, M, 64 * c0, r1, N, K);
    };
    one_phase(nt, work);
    return vnni ? 1 : 0;
}

// The int8 rows in VNNI tiles (see i8_tile_vnni; lut.i8_pack_tiles): wt [ceil(N/64)][ceil(K/4)][256] uint8 (w + 128),
// scale [N], bias [N] or null, x [M][K], y [M][N]. Tokens with a non-finite activation get NaN outputs.
// Returns 0, -1 bad arguments, -2 without AVX-512 VNNI.
int ws_i8_gemm_tiles(const uint8_t* wt, const float* scale, const float* bias, const float* x, float* y, int64_t M, int64_t N,
                     int64_t K, int threads) {
    if (M < 0 || N < 0 || K < 1 || K > I8_VNNI_MAX_K || !wt || !scale || !x || !y) return -1;
    if (!have_vnni()) return -2;
    if (M == 0 || N == 0) return 0;
    const int64_t k4 = (K + 3) / 4, kp = 4 * k4, ntiles = (N + TILE - 1) / TILE;
    std::vector<int8_t> a((size_t)M * 2 * kp, 0);
    std::vector<float> sv((size_t)M * 2);
    std::vector<int32_t> off((size_t)M * 2);
    std::vector<char> ok((size_t)M);
    for (int64_t m = 0; m < M; ++m) {
        int64_t t1 = 0, t2 = 0;
        ok[m] = i8_quantize_token(x + m * K, K, a.data() + m * 2 * kp, a.data() + m * 2 * kp + kp, &sv[2 * m], &sv[2 * m + 1], &t1, &t2);
        off[2 * m] = (int32_t)(128 * t1);
        off[2 * m + 1] = (int32_t)(128 * t2);
    }
    int nt = threads < 1 ? 1 : threads;
    if (nt > ntiles) nt = (int)ntiles;
    auto work = [&](int id, int n) {
        alignas(64) float out[4][TILE];
        float* op[4] = {out[0], out[1], out[2], out[3]};
        for (int64_t t = ntiles * id / n; t < ntiles * (id + 1) / n; ++t) {
            const int64_t rows = N - t * TILE < TILE ? N - t * TILE : TILE;
            const uint8_t* w = wt + t * k4 * 256;
            for (int64_t m = 0; m < M;) {
                const int here = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
                const int8_t* p1[4];
                const int8_t* p2[4];
                int32_t o1[4], o2[4];
                float f1[4], f2[4];
                for (int j = 0; j < here; ++j) {
                    p1[j] = a.data() + (m + j) * 2 * kp;
                    p2[j] = p1[j] + kp;
                    o1[j] = off[2 * (m + j)];
                    o2[j] = off[2 * (m + j) + 1];
                    f1[j] = sv[2 * (m + j)];
                    f2[j] = sv[2 * (m + j) + 1];
                }
                if (here == 4) i8_tile_vnni<4, 2>(w, k4, p1, p2, o1, o2, f1, f2, op);
                else if (here == 2) i8_tile_vnni<2, 4>(w, k4, p1, p2, o1, o2, f1, f2, op);
                else i8_tile_vnni<1, 4>(w, k4, p1, p2, o1, o2, f1, f2, op);
                for (int j = 0; j < here; ++j) {
                    float* yo = y + (m + j) * N + t * TILE;
                    for (int64_t r = 0; r < rows; ++r) {
                        const float v = out[j][r] * scale[t * TILE + r];
                        yo[r] = ok[m + j] ? (bias ? v + bias[t * TILE + r] : v) : NAN;
                    }
                }
                m += here;
            }
        }
    };
    one_phase(nt, work);
    return 0;
}

// 1 where ws_i8_gemm's act8 path (AVX-512 VNNI) runs on this CPU.
int ws_i8_vnni() { return have_vnni() ? 1 : 0; }

// ---------------------------------------------------------------- one decode step of a Llama-shaped block stack
// (weightsmith/kernels/lean.py: the lean loop's single-token step with every projection on the kernel;
// RMSNorm, rotary embedding, the KV cache write, grouped-KV attention and the SiLU gate in plain float
// code between the kernel calls, so a decoded token costs no Python or torch dispatch per layer.)
struct WsLin {
    const uint8_t* w;
    const uint16_t* scale;
    const int8_t* z2;    // uniform grid (null for HLQ planes)
    const float* zc;     // HLQ planes (null for a uniform grid)
    const int32_t* perm;  // null: identity
    const float* bias;    // may be null
    int64_t N, K, Kp, G, S;
    int32_t bits, layout;  // layout 0: bit planes (gemm), 1: 4-bit nibbles for VNNI (gemm_dot)
};

struct WsLayer {
    const float* n1;  // input RMSNorm weight [H]
    const float* n2;  // post-attention RMSNorm weight [H]
    WsLin qkv;        // rows: q (nh hd), k (nkv hd), v (nkv hd)
    WsLin o;          // nh hd -> H
    WsLin gu;         // rows: gate (inter), up (inter)
    WsLin down;       // inter -> H
    float* kc;        // [nkv][max_len][hd]
    float* vc;
};

static int lin(const WsLin& L, const float* x, float* y, int passes, int threads) {
    if (L.layout == 1) return gemm_dot(L.w, L.scale, L.z2, L.perm, L.bias, x, y, 1, L.N, L.K, L.Kp, L.G, L.bits, passes, threads);
    return gemm(L.w, L.scale, L.z2, L.zc, L.perm, L.bias, x, y, 1, L.N, L.K, L.Kp, L.G, L.S, L.bits, passes, threads, -1);
}

static void rms_norm(const float* x, const float* w, float* h, int64_t H, float eps) {
    double ss = 0.0;
    for (int64_t k = 0; k < H; ++k) ss += (double)x[k] * x[k];
    const float r = 1.0f / std::sqrt((float)(ss / (double)H) + eps);
    for (int64_t k = 0; k < H; ++k) h[k] = w[k] * (x[k] * r);
}

// One head's attention over L cached positions: out = softmax(scaling q·k_t) · v_t, lanes of 8 (AVX2).
__attribute__((target("avx2,fma"))) static void attend(const float* q, const float* kb, const float* vb, int64_t L, int64_t hd,
                                                        float scaling, float* p, float* out) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
        const float* k = kb + t * hd;
        __m256 acc = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= hd; c += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c)));
        alignas(32) float l[8];
        _mm256_store_ps(l, acc);
        float d = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for (; c < hd; ++c) d += q[c] * k[c];
        p[t] = d * scaling;
        mx = p[t] > mx ? p[t] : mx;
    }
    float den = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
        p[t] = std::exp(p[t] - mx);
        den += p[t];
    }
    for (int64_t c = 0; c < hd; ++c) out[c] = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
        const float wt = p[t] / den;
        const float* v = vb + t * hd;
        const __m256 w8 = _mm256_set1_ps(wt);
        int64_t c = 0;
        for (; c + 8 <= hd; c += 8) _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), _mm256_mul_ps(w8, _mm256_loadu_ps(v + c))));
        for (; c < hd; ++c) out[c] += wt * v[c];
    }
}

// x [H] in/out: the hidden state of the token at position pos, through all layers (before the final
// norm). cos, sin [hd]: the rotary embedding of position pos. Returns 0, or the first kernel error.
int ws_lean_step(const WsLayer* layers, int64_t nl, float* x, const float* cos, const float* sin, int64_t pos, int64_t max_len,
                 int64_t H, int64_t nh, int64_t nkv, int64_t hd, int64_t inter, float eps, float scaling, int passes, int threads) {
    if (nl < 1 || pos < 0 || pos >= max_len || H < 1 || nh < 1 || nkv < 1 || nh % nkv || hd < 2 || hd % 2 || inter < 1) return -1;
    const int64_t nq = nh * hd, nqkv = (nh + 2 * nkv) * hd, half = hd / 2, L = pos + 1, rep = nh / nkv;
    thread_local std::vector<float> buf;
    buf.resize((size_t)(H + nqkv + nq + H + 2 * inter + L));
    float* h = buf.data();
    float* y = h + H;
    float* att = y + nqkv;
    float* o = att + nq;
    float* g = o + H;
    float* p = g + 2 * inter;
    for (int64_t i = 0; i < nl; ++i) {
        const WsLayer& Ly = layers[i];
        if (Ly.qkv.N != nqkv || Ly.o.N != H || Ly.gu.N != 2 * inter || Ly.down.N != H) return -1;
        rms_norm(x, Ly.n1, h, H, eps);
        int rc = lin(Ly.qkv, h, y, passes, threads);
        if (rc) return rc;
        for (int64_t j = 0; j < nh + nkv; ++j) {  // rotary: v*cos + rotate_half(v)*sin
            float* v = y + j * hd;
            for (int64_t t = 0; t < half; ++t) {
                const float a = v[t], b = v[t + half];
                v[t] = a * cos[t] - b * sin[t];
                v[t + half] = b * cos[t + half] + a * sin[t + half];
            }
        }
        for (int64_t gk = 0; gk < nkv; ++gk) {
            std::memcpy(Ly.kc + (gk * max_len + pos) * hd, y + nq + gk * hd, hd * sizeof(float));
            std::memcpy(Ly.vc + (gk * max_len + pos) * hd, y + nq + (nkv + gk) * hd, hd * sizeof(float));
        }
        for (int64_t j = 0; j < nh; ++j)  // head j reads KV head j / rep
            attend(y + j * hd, Ly.kc + (j / rep) * max_len * hd, Ly.vc + (j / rep) * max_len * hd, L, hd, scaling, p, att + j * hd);
        if ((rc = lin(Ly.o, att, o, passes, threads))) return rc;
        for (int64_t k = 0; k < H; ++k) x[k] += o[k];
        rms_norm(x, Ly.n2, h, H, eps);
        if ((rc = lin(Ly.gu, h, g, passes, threads))) return rc;
        for (int64_t k = 0; k < inter; ++k) {
            const float z = g[k];
            g[k] = z / (1.0f + std::exp(-z)) * g[inter + k];
        }
        if ((rc = lin(Ly.down, g, o, passes, threads))) return rc;
        for (int64_t k = 0; k < H; ++k) x[k] += o[k];
    }
    return 0;
}

}  // extern "C"


