/* KV-cached decoding of a μOmni Thinker on the CPU, in C (built and loaded by utils/engine/native/step.py): a decode
   step for a batch of rows (mu_step) and the prefill of one prompt (mu_prefill).

   Why C: a decode step of these small models is a few dozen tiny matrix-vector products; through torch each
   costs 2-17 µs of dispatch on top of the arithmetic, so the step was bound by per-op overhead, not by the
   memory it reads. Here a whole step (embedding row, every block, final norm, vocabulary projection and, for
   greedy decoding, the argmax) is one call that reads each weight once for all rows of the batch.

   Numbers: the same formulas as models/layers.py (RMSNorm, rotate-half RoPE, softmax attention over the row's
   real keys, SwiGLU or exact-erf GELU); sums run in another order than torch's kernels, so results agree with
   the torch path up to float rounding. Every output is computed by the same instruction sequence whatever the
   batch size and its place in the batch, so a row's numbers do not depend on the batch it is in.

   Threads: a session may compute on several threads (mu_session.threads, a pool from mu_pool_new). Each
   projection is split by blocks of 64 outputs (a float32 panel; whole int8 tiles of every shape; a few chunks per
   thread, more of about 128 KB of weights each for a large one) and attention by (position, query head); no sum
   is split, so every output is computed by the same instructions on any
   thread count, and the numbers are the same bit for bit. Norms, RoPE, the cache writes, the activation and the
   activations' quantization are split by positions for a prefill (from MU_PARALLEL_ROWS rows) and stay on the
   calling thread for a decode step, where they cost less than a parallel region; the argmax stays there too.

   int8 weights (utils.weights.quant.Int8Linear: per-output-channel scales) are stored here with their sign bit
   flipped (w + 128 as unsigned bytes) so AVX-512 VNNI's unsigned-by-signed byte product applies; activations
   are quantized per row to int8 (step = max|x| / 127), so sum_k (w_k + 128) x_k - 128 sum_k x_k = sum_k w_k x_k
   is exact in int32, and the output is that sum times the channel's scale times the row's step. Without VNNI, AVX2
   takes the same bytes as int16 pairs (vpmaddwd, exact: see tile_u8_avx2), repacked by step.py in tiles of 4 rows.

   Each function and its torch twin (models/layers.py unless named otherwise; quant = utils/weights/quant.py):
     mu_step              CausalStack.decode_hidden, then ThinkerLM.head and torch.argmax / quant.GreedyHead.argmax
     mu_prefill           CausalStack.hidden (Block.forward, the full forward), then ThinkerLM.head
     forward              Block.decode through its DecodeStep, for every layer, then the final RMSNorm.fast
     rms_norm             RMSNorm.fast (F.rms_norm) / RMSNorm.forward
     project, linear      row_linear (F.linear), row_residual (torch.addmm: accumulate = 1), quant.Int8Linear.forward
     linear_panels        F.linear on float32 weights laid out by step.py's to_panels
     linear_tiles         quant.Int8Linear.forward (int8 weights; here on int8 activations)
     linear_panels_avx2   linear_panels on AVX2 + FMA (CPUs without AVX-512)
     linear_u8_avx2       linear_tiles on AVX2 (int8 weights in step.py's to_int8_tiles layout)
     linear_int4          quant.Int4Linear.forward (int4 weights; here on int8 activations per group of 32)
     quantize_groups      quant.quantize_rows, per group of 32 inputs (the int4 section)
     quantize_rows        quant.quantize_rows
     rope                 apply_rotary
     store_kv             attend_rows: RoPE on q and k, KVCache.update
     attend, attend_head  attend_rows: F.scaled_dot_product_attention over the row's real keys (the key mask), per head
                          (attend_head_avx2 on AVX2)
     activate             row_ffn: F.silu(gate) * up (SwiGLU.forward), F.gelu (GeluMLP.forward)
     head                 ThinkerLM.head (models/thinker.py), then torch.argmax
     argmax               torch.argmax (ties: the lowest id; a NaN: the first NaN)
     screened_argmax      quant.GreedyHead.argmax (candidates, exact rescoring, the full projection's fallback)
     at_least             quant.GreedyHead.candidates (the threshold best - 2 bound)
     head_score           the exact scores of quant.GreedyHead.argmax
     mu_scratch_bytes     none: the torch step allocates as it goes; here one scratch buffer per session
     mu_pool_new/free     none: torch's intra-op threads (torch.get_num_threads(), what --threads sets)
     run_chunks           at::parallel_for (here: chunks of outputs handed out to the pool's threads)
     linear_threads       linear over the pool; attend_threads: attend over the pool
     positions            the per-position stages of `forward` (norms, store_kv, activate) over the pool
     quantize_chunk       quantize_rows / quantize_groups on a part of the rows (project, over the pool)
     mu_abi               step.py's ABI_VERSION and struct_layout (the structs below, declared again in ctypes) */
#if defined(__linux__)
#define _GNU_SOURCE  /* pthread_setname_np */
#endif
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define MU_AVX512 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MU_VNNI 1  /* VL: the 128-bit masked stores of the 4 x 4 int8 tile (every VNNI CPU has it) */
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MU_AVX2 1  /* 256-bit kernels (see "AVX2 + FMA" below) where the AVX-512 / VNNI ones are not built, and
                      the int4 kernel's AVX2 path (its own section) */
#endif

typedef struct {
    const void *w;       /* float32 [n][k] (or in panels, see below), or uint8 [n][k] holding int8 weights + 128 */
    const float *scale;  /* int8: per-row scale [n]; NULL for float32 */
    const float *bias;   /* [n] or NULL */
    int32_t n, k;
    int32_t panels;      /* float32, 1: stored as ceil(n / 64) panels [k][64] (row 64 p + l of W at column l of
                            panel p, zero rows past n), the layout of linear_panels (mu_f32_panels() says if used);
                            int8, 1: in tiles of 4 rows, the layout of linear_u8_avx2 (mu_int8_tiles()) */
    int32_t format;      /* MU_FORMAT_PLAIN (float32, or int8 where scale is set) or MU_FORMAT_INT4 (w: codes and
                            (scale, zero) pairs in tiles of 8 rows, see the int4 section) */
} mu_linear;

#define MU_FORMAT_PLAIN 0
#define MU_FORMAT_INT4 1

typedef struct {
    const float *norm1, *norm2;
    float eps1, eps2;
    mu_linear qkv;  /* q (heads * head_dim rows), then k and v (kv_heads * head_dim rows each) */
    mu_linear o;
    mu_linear up;   /* SwiGLU: gate rows then up rows (2 * d_ff); GELU: fc1 (d_ff) */
    mu_linear down;
} mu_layer;

typedef struct {
    int32_t n_layers, d, heads, kv_heads, head_dim, d_ff, vocab, gelu, rope_len, screen_k;
    const mu_layer *layers;
    const float *emb;     /* [vocab][d] */
    const float *norm;
    float eps;
    mu_linear head;       /* float32 or int8 */
    mu_linear screen;     /* int8 copy of a float32 head for the greedy screen, or n == 0 */
    float screen_x, screen_c, screen_slack;  /* bound = (|h|_1 * screen_x / step + screen_c) * screen_slack */
    const float *cos, *rot_sin;              /* [rope_len][head_dim] (models.layers.Rotary) */
} mu_model;

typedef struct {
    float *k, *v;                              /* KVCache tensors, (layers, rows, kv_heads, columns, head_dim) */
    int64_t layer_stride, row_stride, head_stride;  /* in floats; a column is head_dim floats */
    int32_t columns, rows;
    int32_t positions;                         /* most positions one call computes (>= rows; a prefill's length) */
    int32_t threads;                           /* threads a call computes on, the caller's included (>= 1) */
    unsigned char *scratch;                    /* mu_scratch_bytes(model, rows, positions, columns, threads) bytes */
    struct mu_pool *pool;                      /* mu_pool_new(threads) when threads > 1, else NULL */
} mu_session;

/* ------------------------------------------------------------------ the ABI shared with step.py */

/* Bump with step.py's ABI_VERSION whenever a struct above or an exported function's signature changes. */
#define MU_ABI_VERSION 4

/* Per shared struct (mu_linear, mu_layer, mu_model, mu_session, in that order): its size, then the offset of
   each field in declaration order; step.py's struct_layout() computes the same list from its ctypes
   declarations and refuses a library that disagrees (a reordered or resized field would corrupt memory). */
#define MU_LAYOUT(type, ...) (int32_t)sizeof(type), __VA_ARGS__
#define MU_AT(type, field) (int32_t)offsetof(type, field)
static const int32_t mu_layout[] = {
    MU_LAYOUT(mu_linear, MU_AT(mu_linear, w), MU_AT(mu_linear, scale), MU_AT(mu_linear, bias), MU_AT(mu_linear, n),
              MU_AT(mu_linear, k), MU_AT(mu_linear, panels), MU_AT(mu_linear, format)),
    MU_LAYOUT(mu_layer, MU_AT(mu_layer, norm1), MU_AT(mu_layer, norm2), MU_AT(mu_layer, eps1), MU_AT(mu_layer, eps2),
              MU_AT(mu_layer, qkv), MU_AT(mu_layer, o), MU_AT(mu_layer, up), MU_AT(mu_layer, down)),
    MU_LAYOUT(mu_model, MU_AT(mu_model, n_layers), MU_AT(mu_model, d), MU_AT(mu_model, heads),
              MU_AT(mu_model, kv_heads), MU_AT(mu_model, head_dim), MU_AT(mu_model, d_ff), MU_AT(mu_model, vocab),
              MU_AT(mu_model, gelu), MU_AT(mu_model, rope_len), MU_AT(mu_model, screen_k), MU_AT(mu_model, layers),
              MU_AT(mu_model, emb), MU_AT(mu_model, norm), MU_AT(mu_model, eps), MU_AT(mu_model, head),
              MU_AT(mu_model, screen), MU_AT(mu_model, screen_x), MU_AT(mu_model, screen_c),
              MU_AT(mu_model, screen_slack), MU_AT(mu_model, cos), MU_AT(mu_model, rot_sin)),
    MU_LAYOUT(mu_session, MU_AT(mu_session, k), MU_AT(mu_session, v), MU_AT(mu_session, layer_stride),
              MU_AT(mu_session, row_stride), MU_AT(mu_session, head_stride), MU_AT(mu_session, columns),
              MU_AT(mu_session, rows), MU_AT(mu_session, positions), MU_AT(mu_session, threads),
              MU_AT(mu_session, scratch), MU_AT(mu_session, pool)),
};
#undef MU_AT
#undef MU_LAYOUT

/* The ABI version; writes the layout's first n entries to `layout`, and -1 to any entry past its end (so a
   caller expecting a longer or a shorter list sees the difference). */
int32_t mu_abi(int32_t *layout, int32_t n) {
    const int32_t have = (int32_t)(sizeof(mu_layout) / sizeof(mu_layout[0]));
    for (int32_t i = 0; i < n; i++)
        layout[i] = i < have ? mu_layout[i] : -1;
    return MU_ABI_VERSION;
}

/* ------------------------------------------------------------------ the thread pool */

/* Workers kept between calls (a session's, started once by mu_pool_new). A parallel region hands out chunks of
   work through one atomic ticket (the region's round in the high 32 bits, the next chunk in the low 32), so a
   chunk is done exactly once, by whichever thread takes it: the caller takes chunks too, and a worker that the
   machine preempted (a loaded one) only leaves more chunks to the others. A chunk computes its outputs with the
   instructions it would run alone, so the numbers do not depend on the thread count. Between regions a worker
   spins briefly (inside a step the next region follows within microseconds), then sleeps on a condition
   variable (between steps it blocks). */
typedef void (*mu_task)(const void *ctx, int32_t chunk, int32_t who);

struct mu_pool;
typedef struct {
    struct mu_pool *pool;
    int32_t who;                  /* 1 .. threads - 1 (the caller is 0): which scratch it uses */
} mu_worker;

typedef struct mu_pool {
    int32_t threads;              /* the caller and threads - 1 workers */
    pthread_t *ids;
    mu_worker *workers;
    pthread_mutex_t lock;
    pthread_cond_t wake, finished;
    uint32_t round;               /* the current region, bumped as it starts (read while spinning: atomic) */
    uint64_t ticket;              /* round << 32 | the next chunk to take */
    int32_t chunks, done;         /* the region's chunks, and how many have finished */
    mu_task task;
    const void *ctx;
    int stop;
} mu_pool;

#define MU_SPIN 2000  /* polls, a pause each (some microseconds), before a waiting thread blocks */

static inline void mu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Take and run chunks of round `round` until none is left; the last chunk to finish wakes the caller. */
static void take_chunks(mu_pool *p, uint32_t round, mu_task task, const void *ctx, int32_t chunks, int32_t who) {
    for (;;) {
        uint64_t t = __atomic_load_n(&p->ticket, __ATOMIC_ACQUIRE);
        if ((uint32_t)(t >> 32) != round || (int32_t)(uint32_t)t >= chunks)
            return;
        if (!__atomic_compare_exchange_n(&p->ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        task(ctx, (int32_t)(uint32_t)t, who);
        if (__atomic_add_fetch(&p->done, 1, __ATOMIC_ACQ_REL) == chunks) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->finished);
            pthread_mutex_unlock(&p->lock);
        }
    }
}

static void *pool_worker(void *arg) {
    const mu_worker *w = arg;
    mu_pool *p = w->pool;
    uint32_t seen = 0;
    for (;;) {
        for (int i = 0; i < MU_SPIN && __atomic_load_n(&p->round, __ATOMIC_ACQUIRE) == seen
                        && !__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE); i++)
            mu_pause();
        pthread_mutex_lock(&p->lock);
        while (p->round == seen && !p->stop)
            pthread_cond_wait(&p->wake, &p->lock);
        if (p->stop) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        seen = p->round;
        const mu_task task = p->task;
        const void *ctx = p->ctx;
        const int32_t chunks = p->chunks;
        pthread_mutex_unlock(&p->lock);
        take_chunks(p, seen, task, ctx, chunks, w->who);
    }
}

/* Runs task(ctx, c, who) for c = 0 .. chunks - 1 over the pool's threads (who: the thread's index, 0 for the
   caller), returning when every chunk is done; without a pool, all of them here. */
static void run_chunks(mu_pool *p, mu_task task, const void *ctx, int32_t chunks) {
    if (p == NULL || chunks <= 1) {
        for (int32_t c = 0; c < chunks; c++)
            task(ctx, c, 0);
        return;
    }
    pthread_mutex_lock(&p->lock);
    const uint32_t round = p->round + 1;
    p->task = task;
    p->ctx = ctx;
    p->chunks = chunks;
    __atomic_store_n(&p->done, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&p->ticket, (uint64_t)round << 32, __ATOMIC_RELEASE);
    __atomic_store_n(&p->round, round, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    take_chunks(p, round, task, ctx, chunks, 0);
    for (int i = 0; i < MU_SPIN && __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < chunks; i++)
        mu_pause();
    pthread_mutex_lock(&p->lock);
    while (__atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < chunks)
        pthread_cond_wait(&p->finished, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

/* Stops and joins the pool's workers, then frees it (NULL: nothing). */
void mu_pool_free(mu_pool *p) {
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->lock);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int32_t i = 0; i < p->threads - 1; i++)
        pthread_join(p->ids[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->finished);
    pthread_mutex_destroy(&p->lock);
    free(p->ids);
    free(p->workers);
    free(p);
}

/* A pool for calls on `threads` threads (the caller and threads - 1 workers, started here), or NULL if
   threads < 2 or a thread cannot be started (none is left running). */
mu_pool *mu_pool_new(int32_t threads) {
    if (threads < 2)
        return NULL;
    mu_pool *p = calloc(1, sizeof(mu_pool));
    if (p == NULL)
        return NULL;
    p->ids = calloc((size_t)threads, sizeof(pthread_t));
    p->workers = calloc((size_t)threads, sizeof(mu_worker));
    if (p->ids == NULL || p->workers == NULL) {
        free(p->ids);
        free(p->workers);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->finished, NULL);
    for (p->threads = 1; p->threads < threads; p->threads++) {
        mu_worker *w = &p->workers[p->threads - 1];
        w->pool = p;
        w->who = p->threads;
        if (pthread_create(&p->ids[p->threads - 1], NULL, pool_worker, w) != 0) {
            mu_pool_free(p);  /* joins the p->threads - 1 already started */
            return NULL;
        }
#if defined(__linux__)
        /* named here, not by the worker as it starts: a busy machine may run it only much later (top -H and
           /proc/PID/task/ID/comm show the name) */
        pthread_setname_np(p->ids[p->threads - 1], "muomni-step");
#endif
    }
    return p;
}

/* ------------------------------------------------------------------ scratch layout */

typedef struct {
    float *x, *h, *qkv, *att, *ff, *out, *step;
    float *scores;                  /* per thread (who), scores_stride floats each */
    size_t scores_stride;
    mu_pool *pool;                  /* the session's, or NULL */
    int8_t *xq;
    int32_t *corr, *cand;
    int64_t *row, *column, *first;  /* per position: its cache row, its cache column, its sequence's first column */
    float *gstep, *gsum;            /* int4 projections: per position and group of 32 inputs, quantize_groups */
} mu_buffers;

static size_t round_up(size_t n) { return (n + 63) & ~(size_t)63; }

static int32_t max_k(const mu_model *m) {
    int32_t k = m->d > m->d_ff ? m->d : m->d_ff;
    int32_t att = m->heads * m->head_dim;
    return k > att ? k : att;
}

/* Scratch for `positions` positions computed at once, logits of up to `rows` rows, attention over `columns` on
   `threads` threads. */
static size_t carve(const mu_model *m, int32_t rows, int32_t positions, int32_t columns, int32_t threads,
                    unsigned char *base, mu_buffers *b) {
    size_t qkv = (size_t)(m->heads + 2 * m->kv_heads) * m->head_dim, att = (size_t)m->heads * m->head_dim;
    size_t ff = (size_t)(m->gelu ? 1 : 2) * m->d_ff, off = 0, n = (size_t)positions;
#define TAKE(field, type, count) do { if (b) b->field = (type *)(base + off); \
        off += round_up(sizeof(type) * (size_t)(count)); } while (0)
    TAKE(x, float, n * m->d);
    TAKE(h, float, n * m->d);
    TAKE(qkv, float, n * qkv);
    TAKE(att, float, n * att);
    TAKE(ff, float, n * ff);
    const size_t scores_stride = round_up(sizeof(float) * (size_t)columns) / sizeof(float);
    if (b)
        b->scores_stride = scores_stride;
    TAKE(scores, float, scores_stride * (size_t)threads);
    TAKE(out, float, (size_t)rows * m->vocab);
    TAKE(step, float, n);
    TAKE(xq, int8_t, n * round_up(max_k(m)));
    TAKE(corr, int32_t, n);
    TAKE(cand, int32_t, m->vocab);
    TAKE(row, int64_t, n);
    TAKE(column, int64_t, n);
    TAKE(first, int64_t, n);
    TAKE(gstep, float, n * round_up(max_k(m)) / 32);
    TAKE(gsum, float, n * round_up(max_k(m)) / 32);
#undef TAKE
    return off;
}

size_t mu_scratch_bytes(const mu_model *m, int32_t rows, int32_t positions, int32_t columns, int32_t threads) {
    return carve(m, rows, positions, columns, threads, NULL, NULL);
}

/* 1 when float32 weights should come in panels (this build has the AVX-512 or the AVX2 panel kernel), else 0. */
int mu_f32_panels(void) {
#if defined(MU_AVX512) || defined(MU_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* 4 when int8 weights should come in tiles of 4 rows (this build has the AVX2 int8 kernel; k a multiple of 16),
   else 0 (rows). */
int mu_int8_tiles(void) {
#if defined(MU_AVX2) && !defined(MU_VNNI)
    return 4;
#else
    return 0;
#endif
}

const char *mu_features(void) {
#if defined(MU_VNNI)
    return "avx512-vnni";
#elif defined(MU_AVX512) && defined(MU_AVX2)
    return "avx512+avx2";  /* float32 panels in AVX-512, int8 tiles in AVX2 */
#elif defined(MU_AVX512)
    return "avx512";
#elif defined(MU_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

/* ------------------------------------------------------------------ dot products */

/* Portable dot products (the path without AVX-512, and for inner sizes the vector tiles do not take). */
static inline float dot_f32(const float *w, const float *x, int32_t k) {
    float s = 0.0f;
    for (int32_t i = 0; i < k; i++)
        s += w[i] * x[i];
    return s;
}

static inline int32_t dot_u8s8(const uint8_t *w, const int8_t *x, int32_t k) {
    int32_t s = 0;
    for (int32_t i = 0; i < k; i++)
        s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

#if defined(MU_AVX512)
/* Sixteen 16-lane accumulators reduced together by one fixed tree: the 16 attention scores of a block of keys
   (float32), the 16 outputs of an int8 tile (exact int32 sums). */

#define MU_SHUF_LO 0x88 /* 128-bit lanes 0, 2 of a, then 0, 2 of b */
#define MU_SHUF_HI 0xDD /* lanes 1, 3 of a, then 1, 3 of b */

/* Lane i of the result: the sum of the 16 lanes of a[i], as ((l0 + l2) + (l1 + l3)) within each 128-bit lane,
   then ((L0 + L1) + (L2 + L3)) across them. */
static inline __m512 reduce16_ps(const __m512 *a) {
    __m512 q[8], r[4];
    for (int i = 0; i < 8; i++)
        q[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(q[2 * i]), _mm512_castps_pd(q[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(q[2 * i]), _mm512_castps_pd(q[2 * i + 1]));
        r[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], MU_SHUF_LO), _mm512_shuffle_f32x4(r[0], r[1], MU_SHUF_HI));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], MU_SHUF_LO), _mm512_shuffle_f32x4(r[2], r[3], MU_SHUF_HI));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, MU_SHUF_LO), _mm512_shuffle_f32x4(u01, u23, MU_SHUF_HI));
}

static inline __m512i reduce16_epi32(const __m512i *a) {
    __m512i q[8], r[4];
    for (int i = 0; i < 8; i++)
        q[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]),
                                _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        r[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2 * i], q[2 * i + 1]),
                                _mm512_unpackhi_epi64(q[2 * i], q[2 * i + 1]));
    __m512i u01 = _mm512_add_epi32(_mm512_shuffle_i32x4(r[0], r[1], MU_SHUF_LO),
                                   _mm512_shuffle_i32x4(r[0], r[1], MU_SHUF_HI));
    __m512i u23 = _mm512_add_epi32(_mm512_shuffle_i32x4(r[2], r[3], MU_SHUF_LO),
                                   _mm512_shuffle_i32x4(r[2], r[3], MU_SHUF_HI));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(u01, u23, MU_SHUF_LO), _mm512_shuffle_i32x4(u01, u23, MU_SHUF_HI));
}

/* exp(x) for 16 floats, within about 1 ulp of expf (Cody-Waite reduction by ln 2, the Cephes polynomial,
   scaling by 2^n): the softmax and SiLU of a step call it thousands of times. NaN stays NaN. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-103.972084f), _mm512_min_ps(_mm512_set1_ps(88.3762626f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#endif

#if defined(MU_AVX512)
/* Float32 weights in panels of 64 output rows stored column by column ([k][64]): for each k, four vectors of 16
   weights times the broadcast input, so each accumulator holds 16 outputs and is never reduced across lanes,
   and a panel is read as one sequential stream. A tile is one panel x R input rows (4 R accumulators, R up to
   6); every output sums its products over k = 0, 1, ... in order in its own lane, whatever the tile, so a row's outputs
   do not depend on its batch. Rows past the end of a partial tile repeat the last one and are not stored. */
static inline __attribute__((always_inline)) void panel_tile(const int R, const float *wp, int32_t k,
                                                             const float *x, int32_t ldx, int32_t nr, __m512 *acc) {
    const float *xr[6];
    for (int r = 0; r < R; r++)
        xr[r] = x + (size_t)(r < nr ? r : nr - 1) * ldx;
    for (int i = 0; i < 4 * R; i++)
        acc[i] = _mm512_setzero_ps();
    for (int32_t i = 0; i < k; i++) {
        const float *wi = wp + (size_t)i * 64;
        const __m512 w0 = _mm512_loadu_ps(wi), w1 = _mm512_loadu_ps(wi + 16);
        const __m512 w2 = _mm512_loadu_ps(wi + 32), w3 = _mm512_loadu_ps(wi + 48);
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_set1_ps(xr[r][i]);
            acc[4 * r] = _mm512_fmadd_ps(w0, xv, acc[4 * r]);
            acc[4 * r + 1] = _mm512_fmadd_ps(w1, xv, acc[4 * r + 1]);
            acc[4 * r + 2] = _mm512_fmadd_ps(w2, xv, acc[4 * r + 2]);
            acc[4 * r + 3] = _mm512_fmadd_ps(w3, xv, acc[4 * r + 3]);
        }
    }
}

static inline __attribute__((always_inline)) void linear_panels_r(const int R, const mu_linear *L, int32_t rows,
        const float *x, int32_t ldx, float *y, int32_t ldy, int accumulate) {
    const int32_t n = L->n, k = L->k, P = (n + 63) / 64;
    __m512 acc[24];
    for (int32_t p = 0; p < P; p++) {
        const float *wp = (const float *)L->w + (size_t)p * k * 64;
        for (int32_t r0 = 0; r0 < rows; r0 += R) {
            const int32_t nr = rows - r0 < R ? rows - r0 : R;
            panel_tile(R, wp, k, x + (size_t)r0 * ldx, ldx, nr, acc);
            for (int32_t t = 0; t < 4; t++) {
                const int32_t j = p * 64 + t * 16, left = n - j;
                if (left <= 0)
                    break;
                const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                const __m512 bias = L->bias ? _mm512_maskz_loadu_ps(mask, L->bias + j) : _mm512_setzero_ps();
                for (int32_t r = 0; r < nr; r++) {
                    float *yr = y + (size_t)(r0 + r) * ldy + j;
                    __m512 v = _mm512_add_ps(acc[4 * r + t], bias);
                    if (accumulate)
                        v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yr), v);
                    _mm512_mask_storeu_ps(yr, mask, v);
                }
            }
        }
    }
}

/* Y[r] (=, or += with `accumulate`) x[r] W^T (+ bias) for float32 weights in panels. */
static void linear_panels(const mu_linear *L, int32_t rows, const float *x, int32_t ldx, float *y, int32_t ldy,
                          int accumulate) {
    if (rows == 1)
        linear_panels_r(1, L, rows, x, ldx, y, ldy, accumulate);
    else if (rows <= 4)
        linear_panels_r(4, L, rows, x, ldx, y, ldy, accumulate);
    else  /* six rows per tile (24 accumulators): each weight vector read from cache serves more products */
        linear_panels_r(6, L, rows, x, ldx, y, ldy, accumulate);
}
#endif

#if defined(MU_VNNI)
/* int8 tiles: 16 accumulators, one per output, for WR weight rows x AR activation rows (16 x 1, 8 x 2 or 4 x 4:
   a batch reads each weight from memory once, and from registers for every row of the tile); integer sums are
   exact in any order, so an output does not depend on the tile shape, hence on the batch. Rows past the end of
   a partial tile repeat the last row; their lanes are not stored.
   Lane a * WR + t: sum (W_u8 row t * X_s8 row a) over k (a multiple of 64). */
static inline __attribute__((always_inline)) __m512i tile_u8s8(const int WR, const int AR, const uint8_t *w,
                                                               int32_t k, int32_t nw, const int8_t *x, size_t ldx,
                                                               int32_t na) {
    __m512i acc[16];
    const uint8_t *wr[16];
    const int8_t *xr[4];
    for (int t = 0; t < WR; t++)
        wr[t] = w + (size_t)(t < nw ? t : nw - 1) * k;
    for (int a = 0; a < AR; a++)
        xr[a] = x + (size_t)(a < na ? a : na - 1) * ldx;
    for (int i = 0; i < 16; i++)
        acc[i] = _mm512_setzero_si512();
    for (int32_t i = 0; i < k; i += 64) {
        if (AR == 1) {
            const __m512i xv = _mm512_loadu_si512(xr[0] + i);
            for (int t = 0; t < WR; t++)
                acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_loadu_si512(wr[t] + i), xv);
            continue;
        }
        __m512i wv[8];
        for (int t = 0; t < WR; t++)
            wv[t] = _mm512_loadu_si512(wr[t] + i);
        for (int a = 0; a < AR; a++) {
            __m512i xv = _mm512_loadu_si512(xr[a] + i);
            for (int t = 0; t < WR; t++)
                acc[a * WR + t] = _mm512_dpbusd_epi32(acc[a * WR + t], wv[t], xv);
        }
    }
    return reduce16_epi32(acc);
}
#endif

/* ------------------------------------------------------------------ AVX2 + FMA */

#if defined(MU_AVX2)
/* The 256-bit kernels of CPUs without AVX-512 (AMD Zen 1-3, Intel before Skylake-X and its client cores): float32
   panels, int8 tiles, attention, exp; and the int8 tiles of an AVX-512 CPU without VNNI. */

/* Lane i of the result: the sum of the 8 lanes of a[i] (one fixed tree). */
static inline __m256 reduce8_ps(const __m256 *a) {
    const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

/* Lane i: the sum of the 8 int32 lanes of a[i], i = 0 .. 3. */
static inline __m128i reduce4_epi32(const __m256i *a) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for 8 floats, exp512's reduction and polynomial; 2^n applied as 2^(n >> 1) 2^(n - (n >> 1)), both normal
   floats for every n of the clamped range (-150 .. 128). NaN stays NaN. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-103.972084f), _mm256_min_ps(_mm256_set1_ps(88.3762626f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

#if !defined(MU_AVX512)
/* Float32 panels ([k][64], step.py's to_panels) on 256-bit vectors, blocked for the caches as a GEMM: a tile is C
   vectors of 8 outputs x R input rows (one row: the whole panel, C = 8; 2 to 6 rows: a quarter of it, C = 2, 2 R
   accumulators, two weight vectors and a broadcast in the 16 registers, BLIS's 6 x 16 for 6 rows; 2 rows take half
   of it, C = 4, so a batch of up to 8 reads each panel row as one stream from memory). The k loop runs
   in blocks of MU_KC inputs and the rows in blocks of MU_MC, so the block of weights a row block reuses (MU_KC x 256
   bytes) stays in L2 and a tile's rows in L1; between k blocks the accumulators are stored to `part` and loaded
   back (exact). Every output is still one FMA chain over k = 0, 1, ... from 0 in its own lane, whatever C, R and
   the blocking, then + bias, then y + that, so a row's outputs depend neither on its batch nor on the thread count.
   Accumulators are locals (accumulating through the caller's array made gcc store all of them every k). */
#define MU_KC 256  /* inputs per k block */
#define MU_MC 48   /* rows per row block (at most; a multiple of the tile's rows) */

static inline __attribute__((always_inline)) void panel_avx2(const int C, const int R, const float *wp, int32_t k0,
        int32_t k1, const float *const *xr, float *part, int first) {
    __m256 a[16];
    const float *x0 = xr[0], *x1 = xr[R > 1], *x2 = xr[R > 2 ? 2 : 0], *x3 = xr[R > 3 ? 3 : 0];
    const float *x4 = xr[R > 4 ? 4 : 0], *x5 = xr[R > 5 ? 5 : 0];
    for (int i = 0; i < C * R; i++)
        a[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(part + 8 * i);
    for (int32_t i = k0; i < k1; i++) {
        const float *wi = wp + (size_t)i * 64;
        __m256 w[8];
        for (int c = 0; c < C; c++)
            w[c] = _mm256_loadu_ps(wi + 8 * c);
        for (int r = 0; r < R; r++) {
            const float *xp = r == 0 ? x0 : r == 1 ? x1 : r == 2 ? x2 : r == 3 ? x3 : r == 4 ? x4 : x5;
            const __m256 xv = _mm256_broadcast_ss(xp + i);
            for (int c = 0; c < C; c++)
                a[C * r + c] = _mm256_fmadd_ps(w[c], xv, a[C * r + c]);
        }
    }
    for (int i = 0; i < C * R; i++)
        _mm256_storeu_ps(part + 8 * i, a[i]);
}

/* y[0 .. left) (=, or += with `accumulate`) v + bias, left up to 8. */
static inline void store8(float *y, __m256 v, const float *bias, int32_t left, int accumulate) {
    if (left >= 8) {
        if (bias)
            v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
        if (accumulate)
            v = _mm256_add_ps(_mm256_loadu_ps(y), v);
        _mm256_storeu_ps(y, v);
        return;
    }
    float part[8];
    _mm256_storeu_ps(part, v);
    for (int32_t l = 0; l < left; l++) {
        const float u = bias ? part[l] + bias[l] : part[l];
        y[l] = accumulate ? y[l] + u : u;
    }
}

/* part: per tile of a row block R x 64 sums, as [64 / 8 C quarters][R rows][8 C]. */
static inline __attribute__((always_inline)) void panels_avx2_r(const int R, const mu_linear *L, int32_t rows,
        const float *x, int32_t ldx, float *y, int32_t ldy, int accumulate) {
    const int C = R == 1 ? 8 : R == 2 ? 4 : 2, MR = MU_MC / R * R;
    const int32_t n = L->n, k = L->k, P = (n + 63) / 64;
    float part[MU_MC * 64] __attribute__((aligned(64)));
    const float *xr[6];
    for (int32_t p = 0; p < P; p++) {
        const float *wp = (const float *)L->w + (size_t)p * k * 64;
        const int32_t nc = n - p * 64 < 64 ? n - p * 64 : 64;
        for (int32_t m0 = 0; m0 < rows; m0 += MR) {
            const int32_t m1 = rows - m0 < MR ? rows : m0 + MR;
            for (int32_t k0 = 0; k0 < k; k0 += MU_KC) {
                const int32_t k1 = k - k0 < MU_KC ? k : k0 + MU_KC;
                for (int32_t r0 = m0; r0 < m1; r0 += R) {
                    const int32_t nr = rows - r0 < R ? rows - r0 : R;
                    float *pt = part + (size_t)(r0 - m0) * 64;
                    for (int r = 0; r < R; r++)
                        xr[r] = x + (size_t)(r0 + (r < nr ? r : nr - 1)) * ldx;
                    for (int32_t c0 = 0; c0 < nc; c0 += 8 * C)
                        panel_avx2(C, R, wp + c0, k0, k1, xr, pt + c0 * R, k0 == 0);
                    if (k1 < k)
                        continue;
                    for (int32_t r = 0; r < nr; r++)
                        for (int32_t c = 0; c < nc; c += 8) {
                            const int32_t j = p * 64 + c, q = c / (8 * C) * (8 * C);
                            store8(y + (size_t)(r0 + r) * ldy + j, _mm256_loadu_ps(pt + q * R + r * 8 * C + c - q),
                                   L->bias ? L->bias + j : NULL, nc - c, accumulate);
                        }
                }
            }
        }
    }
}

/* Y[r] (=, or += with `accumulate`) x[r] W^T (+ bias) for float32 weights in panels: a decode batch of up to 8 rows
   in tiles of 2 (whose weights come from memory: one stream a panel), more rows (a prefill) in tiles of R rows, R as
   even as the rows allow, up to 6; rows past the end of the last tile repeat its last row. */
static void linear_panels_avx2(const mu_linear *L, int32_t rows, const float *x, int32_t ldx, float *y, int32_t ldy,
                               int accumulate) {
    const int32_t tiles = (rows + 5) / 6, R = rows == 1 ? 1 : rows <= 8 ? 2 : (rows + tiles - 1) / tiles;
    switch (R) {
    case 1: panels_avx2_r(1, L, rows, x, ldx, y, ldy, accumulate); break;
    case 2: panels_avx2_r(2, L, rows, x, ldx, y, ldy, accumulate); break;
    case 3: panels_avx2_r(3, L, rows, x, ldx, y, ldy, accumulate); break;
    case 4: panels_avx2_r(4, L, rows, x, ldx, y, ldy, accumulate); break;
    case 5: panels_avx2_r(5, L, rows, x, ldx, y, ldy, accumulate); break;
    default: panels_avx2_r(6, L, rows, x, ldx, y, ldy, accumulate); break;
    }
}
#endif

#if !defined(MU_VNNI)
/* int8 weights in tiles of 4 rows (step.py's to_int8_tiles when mu_int8_tiles() says 4; mu_linear.panels = 1): tile
   j holds rows 4 j .. 4 j + 3 (zero rows past n) as k / 16 groups of [4][16] bytes, so a tile is one sequential
   stream (the hardware prefetcher follows it; four row streams at once it follows worse). Exact: the weights
   (uint8, w + 128) zero-extended and the activations (int8) sign-extended to int16 (vpmovzxbw, vpmovsxbw), then
   vpmaddwd: each 16-bit product (w + 128) x has |.| <= 255 x 127 = 32385 and a pair of them <= 64770, summed into
   int32 lanes, where vpmaddubsw's int16 pairs would saturate (2 x 255 x 127 > 32767). A k below 2^31 / 32385
   (66,000) keeps every int32 sum exact, so the sums equal dot_u8s8's (the portable path's) whatever the tile.
   sums[4 a + t]: tile row t . activation row a (na real rows; past them the last row again). */
#define MU_TILE_AHEAD 1024  /* bytes of a tile's stream requested ahead of the loads (one line an iteration) */

static inline __attribute__((always_inline)) void tile_u8_avx2(const int R, const uint8_t *wt, int32_t k,
        const int8_t *x, size_t ldx, int32_t na, int32_t *sums) {
    __m256i acc[8];
    const int8_t *xr[2];
    for (int a = 0; a < R; a++)
        xr[a] = x + (size_t)(a < na ? a : na - 1) * ldx;
    for (int i = 0; i < 4 * R; i++)
        acc[i] = _mm256_setzero_si256();
    for (int32_t i = 0; i < k; i += 16) {
        const uint8_t *wi = wt + (size_t)i * 4;
        __m256i wv[4];
        _mm_prefetch((const char *)(wi + MU_TILE_AHEAD), _MM_HINT_T0);  /* a hint: past the end it never faults */
        for (int t = 0; t < 4; t++)
            wv[t] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wi + 16 * t)));
        for (int a = 0; a < R; a++) {
            const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xr[a] + i)));
            for (int t = 0; t < 4; t++)
                acc[4 * a + t] = _mm256_add_epi32(acc[4 * a + t], _mm256_madd_epi16(wv[t], xv));
        }
    }
    for (int a = 0; a < R; a++)
        _mm_storeu_si128((__m128i *)(sums + 4 * a), reduce4_epi32(acc + 4 * a));
}

static inline __attribute__((always_inline)) void linear_u8_avx2_r(const int R, const mu_linear *L, int32_t rows,
        float *y, int32_t ldy, int accumulate, const mu_buffers *b, int with_step) {
    const int32_t n = L->n, k = L->k;
    const size_t ldq = round_up((size_t)k);
    int32_t sums[8];
    for (int32_t j = 0; j < n; j += 4) {
        const int32_t nw = n - j < 4 ? n - j : 4;
        for (int32_t r0 = 0; r0 < rows; r0 += R) {
            const int32_t na = rows - r0 < R ? rows - r0 : R;
            tile_u8_avx2(R, (const uint8_t *)L->w + (size_t)j * k, k, b->xq + (size_t)r0 * ldq, ldq, na, sums);
            for (int32_t a = 0; a < na; a++)
                for (int32_t t = 0; t < nw; t++) {  /* the portable path's arithmetic, output by output */
                    const int32_t r = r0 + a;
                    float v = (float)(sums[4 * a + t] + b->corr[r]) * L->scale[j + t];
                    if (with_step)
                        v *= b->step[r];
                    if (L->bias)
                        v += L->bias[j + t];
                    float *yr = y + (size_t)r * ldy + j + t;
                    *yr = accumulate ? *yr + v : v;
                }
        }
    }
}

/* The int8 path of `linear` for weights in tiles of 4 rows: one activation row a tile, or two. */
static void linear_u8_avx2(const mu_linear *L, int32_t rows, float *y, int32_t ldy, int accumulate,
                           const mu_buffers *b, int with_step) {
    if (rows == 1)
        linear_u8_avx2_r(1, L, rows, y, ldy, accumulate, b, with_step);
    else
        linear_u8_avx2_r(2, L, rows, y, ldy, accumulate, b, with_step);
}
#endif

#if !defined(MU_AVX512)
/* One query head over columns first..pos (attend_head's AVX2 twin, NV = head_dim / 8 vectors): scores 8 columns at
   a time (one reduction tree for 8 dot products), softmax with exp256, the weighted sum of values in registers. */
static inline __attribute__((always_inline)) void attend_head_avx2(const int NV, const float *q, const float *kc,
        const float *vc, int64_t first, int64_t pos, float scale, float *scores, float *out) {
    const int32_t dk = NV * 8, n = (int32_t)(pos - first + 1);
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256 vbest = _mm256_set1_ps(-INFINITY);
    for (int32_t c0 = 0; c0 < n; c0 += 8) {
        const int32_t nc = n - c0 < 8 ? n - c0 : 8;
        __m256 acc[8];
        for (int t = 0; t < 8; t++) {  /* past nc: the last column again (the same score: the max holds) */
            const float *kr = kc + (first + c0 + (t < nc ? t : nc - 1)) * dk;
            acc[t] = _mm256_mul_ps(_mm256_loadu_ps(kr), _mm256_loadu_ps(q));
            for (int v = 1; v < NV; v++)
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(kr + 8 * v), _mm256_loadu_ps(q + 8 * v), acc[t]);
        }
        const __m256 sc = _mm256_mul_ps(reduce8_ps(acc), vscale);
        vbest = _mm256_max_ps(vbest, sc);
        if (nc == 8) {
            _mm256_storeu_ps(scores + c0, sc);
        } else {
            float part[8];
            _mm256_storeu_ps(part, sc);
            memcpy(scores + c0, part, sizeof(float) * nc);
        }
    }
    const float best = hmax8(vbest);
    const __m256 vb = _mm256_set1_ps(best);
    __m256 vtotal = _mm256_setzero_ps();
    int32_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + c), vb));
        _mm256_storeu_ps(scores + c, e);
        vtotal = _mm256_add_ps(vtotal, e);
    }
    float total = hsum8(vtotal);
    for (; c < n; c++) {
        scores[c] = expf(scores[c] - best);
        total += scores[c];
    }
    __m256 o[16];
    for (int v = 0; v < NV; v++)
        o[v] = _mm256_setzero_ps();
    for (c = 0; c < n; c++) {
        const __m256 p = _mm256_set1_ps(scores[c]);
        const float *vr = vc + (first + c) * dk;
        for (int v = 0; v < NV; v++)
            o[v] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * v), o[v]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int v = 0; v < NV; v++)
        _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(o[v], inv));
}
#endif
#endif

/* ------------------------------------------------------------------ layers */

/* q . k for attention scores (a row's own keys: no batch invariance to keep). */
static inline float dot_attn(const float *a, const float *b, int32_t k) {
    int32_t i = 0;
    float s = 0.0f;
#if defined(MU_AVX512)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(MU_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum8(acc);
#endif
    for (; i < k; i++)
        s += a[i] * b[i];
    return s;
}

/* Per-row int8 quantization of activations (B rows of k, leading dimension ldx) as utils.weights.quant.quantize_rows:
   step = max(max|x|, 1e-30) / 127, q = round-half-even(x / step); corr = -128 * sum q. */
static void quantize_rows(const float *x, int32_t rows, int32_t k, int32_t ldx, mu_buffers *b) {
    for (int32_t r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        int8_t *q = b->xq + (size_t)r * round_up((size_t)k);
        int32_t i = 0, sum = 0;
        float amax = 0.0f;
#if defined(MU_AVX512)
        __m512 m = _mm512_setzero_ps();
        for (; i + 16 <= k; i += 16)
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
        amax = _mm512_reduce_max_ps(m);
#elif defined(MU_AVX2)
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 m = _mm256_setzero_ps();
        for (; i + 8 <= k; i += 8)
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xr + i), absmask));
        amax = hmax8(m);
#endif
        for (; i < k; i++) {
            float a = fabsf(xr[i]);
            amax = a > amax ? a : amax;
        }
        const float step = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
        i = 0;
#if defined(MU_AVX512)
        const __m512 vstep = _mm512_set1_ps(step), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        __m512i vsum = _mm512_setzero_si512();
        for (; i + 16 <= k; i += 16) {
            __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xr + i), vstep),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i iv = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
            _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(iv));
            vsum = _mm512_add_epi32(vsum, iv);
        }
        sum = _mm512_reduce_add_epi32(vsum);
#elif defined(MU_AVX2)
        /* 32 at a time: four vectors of 8 int32 packed to bytes (packs works within 128-bit lanes, the permute puts
           the four groups of 4 back in order) */
        const __m256 vstep = _mm256_set1_ps(step), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i vsum = _mm256_setzero_si256();
        for (; i + 32 <= k; i += 32) {
            __m256i iv[4];
            for (int g = 0; g < 4; g++) {
                __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + i + 8 * g), vstep),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                iv[g] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
                vsum = _mm256_add_epi32(vsum, iv[g]);
            }
            const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
            _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(q8, order));
        }
        int32_t part[8];
        _mm256_storeu_si256((__m256i *)part, vsum);
        for (int g = 0; g < 8; g++)
            sum += part[g];
#endif
        for (; i < k; i++) {
            float v = nearbyintf(xr[i] / step);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            q[i] = (int8_t)v;
            sum += q[i];
        }
        b->step[r] = step;
        b->corr[r] = -128 * sum;
    }
}

#if defined(MU_VNNI)
/* The int8 vector path of `linear` for one tile shape: lanes a * WR + t hold outputs (row r0 + a, column j + t). */
static inline __attribute__((always_inline)) void linear_tiles(const int WR, const int AR, const mu_linear *L,
        int32_t rows, float *y, int32_t ldy, int accumulate, const mu_buffers *b, int with_step) {
    const int32_t n = L->n, k = L->k;
    const size_t ldq = round_up((size_t)k);
    int32_t lane_t[16], lane_a[16], lane_out[16];
    for (int l = 0; l < 16; l++) {
        lane_t[l] = l % WR;
        lane_a[l] = l / WR;
        lane_out[l] = lane_a[l] * ldy + lane_t[l];
    }
    const __m512i vt = _mm512_loadu_si512(lane_t), va = _mm512_loadu_si512(lane_a);
    const __m512i vout = _mm512_loadu_si512(lane_out);
    for (int32_t j = 0; j < n; j += WR) {
        const int32_t nw = n - j < WR ? n - j : WR;
        const __mmask16 wmask = _mm512_cmplt_epi32_mask(vt, _mm512_set1_epi32(nw));
        const __m512 scale = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), wmask, vt, L->scale + j, 4);
        __m512 bias = _mm512_setzero_ps();
        if (L->bias)
            bias = _mm512_mask_i32gather_ps(bias, wmask, vt, L->bias + j, 4);
        for (int32_t r0 = 0; r0 < rows; r0 += AR) {
            const int32_t na = rows - r0 < AR ? rows - r0 : AR;
            const __mmask16 mask = wmask & _mm512_cmplt_epi32_mask(va, _mm512_set1_epi32(na));
            __m512i iv = tile_u8s8(WR, AR, (const uint8_t *)L->w + (size_t)j * k, k, nw, b->xq + (size_t)r0 * ldq,
                                   ldq, na);
            iv = _mm512_add_epi32(iv, _mm512_mask_i32gather_epi32(iv, mask, va, b->corr + r0, 4));
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(iv), scale);
            if (with_step)
                v = _mm512_mul_ps(v, _mm512_mask_i32gather_ps(v, mask, va, b->step + r0, 4));
            if (L->bias)
                v = _mm512_add_ps(v, bias);
            float *yt = y + (size_t)r0 * ldy + j;
            if (AR == 1) {
                if (accumulate)
                    v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yt), v);
                _mm512_mask_storeu_ps(yt, mask, v);
            } else if (AR == 4) {  /* four rows of four outputs: 128-bit pieces */
                const __mmask8 m4 = (__mmask8)((1u << nw) - 1u);
                float part[16];
                _mm512_storeu_ps(part, v);
                for (int a = 0; a < na; a++) {
                    __m128 pv = _mm_loadu_ps(part + 4 * a);
                    float *ya = yt + (size_t)a * ldy;
                    if (accumulate)
                        pv = _mm_add_ps(_mm_maskz_loadu_ps(m4, ya), pv);
                    _mm_mask_storeu_ps(ya, m4, pv);
                }
            } else {
                if (accumulate)
                    v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, vout, yt, 4), v);
                _mm512_mask_i32scatter_ps(yt, mask, vout, v, 4);
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------ int4 weights

   utils.weights.quant.Int4Linear (quantize_int4): per output row, groups of 32 inputs, each with a scale s and a
   zero z (bfloat16, those of torch's int4 kernel) and 32 codes c in 0..15 for the weights w = (c - 8) s + z.
   Stored as 16 bytes of codes per group (byte i: code i in the low nibble, code i + 16 in the high one; step.py
   from quant.pack_nibbles) and the (s, z) pairs as bfloat16 bits, both in tiles of 8 rows (below): 20 bytes per
   32 weights, 5 bits a weight. Activations are quantized per group of 32 to int8 (quantize_groups: step t, codes
   q, as llama.cpp's Q8_0), so a group's dot product is
       sum_i x_i w_i ~ s t sum_i c_i q_i + (z - 8 s) t sum_i q_i
   with d_g = sum_i c_i q_i exact in int32. An output is, in float32 with one rounding per operation, over its
   groups g = 0, 1, ... in order
       acc = fma(d_g, s_g * t_g, acc),  zacc = fma(z_g - 8 s_g, t_g * sum_i q_i, zacc),  y = acc + zacc (+ bias)
   in both paths (AVX2: one lane of a vector of 8 rows; portable: fmaf, the same roundings), which depends on the
   output's weights and its row's activations only: a row's numbers do not depend on its batch or the thread
   count, and the portable path's projections equal the AVX2 path's. */

#define MU_GROUP 32

static inline float bf16_bits(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(MU_AVX2)
/* One group of quantize_groups: its 32 codes into q, its step returned, the sum of its codes in *sum (the same
   numbers as the portable loop: division, rounding half to even and clamping are exact in either). */
static inline float quantize_group(const float *xg, int8_t *q, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_loadu_ps(xg + 8 * i);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const float step = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
    const __m256 vstep = _mm256_set1_ps(step), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i iv[4];
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], vstep), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        iv[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
    *sum = _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
    return step;
}
#else
static inline float quantize_group(const float *xg, int8_t *q, int32_t *sum) {
    float amax = 0.0f;
    for (int i = 0; i < MU_GROUP; i++) {
        const float a = fabsf(xg[i]);
        amax = a > amax ? a : amax;
    }
    const float step = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
    *sum = 0;
    for (int i = 0; i < MU_GROUP; i++) {
        float v = nearbyintf(xg[i] / step);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[i] = (int8_t)v;
        *sum += q[i];
    }
    return step;
}
#endif

/* Per row and group of 32 inputs: t = max(max|x|, 1e-30) / 127, q = round-half-even(x / t) in b->xq, t in
   b->gstep, t * sum q in b->gsum (quant.quantize_rows, per group rather than per row). */
static void quantize_groups(const float *x, int32_t rows, int32_t k, int32_t ldx, mu_buffers *b) {
    const size_t ldq = round_up((size_t)k), ldg = ldq / MU_GROUP;
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t g = 0; g < k / MU_GROUP; g++) {
            int32_t sum;
            const float step = quantize_group(x + (size_t)r * ldx + (size_t)g * MU_GROUP,
                                              b->xq + (size_t)r * ldq + (size_t)g * MU_GROUP, &sum);
            b->gstep[(size_t)r * ldg + g] = step;
            b->gsum[(size_t)r * ldg + g] = step * (float)sum;
        }
    }
}

/* int4 weights as the C step lays them out (step.py's to_int4_tiles): tiles of 8 rows, tile j holding rows
   8 j .. 8 j + 7 (zero codes and pairs past n) as k / 32 groups of MU_INT4_TILE_GROUP bytes, one sequential stream
   a tile: 4 x 32 bytes of codes (part p: row p's 16 bytes of the group, then row p + 4's), then the 8 rows'
   (s, z) pairs (bfloat16 bits, s first). 160 bytes per 256 weights: 5 bits a weight, the bytes of Int4Linear. */
#define MU_INT4_TILE 8
#define MU_INT4_TILE_GROUP (4 * 32 + MU_INT4_TILE * 4)
#define MU_INT4_ROWS 4  /* activation rows a pass over a tile takes, at most (int4_tile's R) */
#define MU_INT4_AHEAD 1024  /* bytes of a tile's stream requested ahead of the loads */

#if defined(MU_AVX2)
/* Tile `wt` (8 weight rows) times R activation rows (rows past nr repeat the last), R <= 4: lane t of out[r] =
   weight row t's dot product with activation row r. Per group: each part's codes unpacked once for the R rows (low
   nibbles times the group's first 16 activations, high nibbles times its last 16, both broadcast to the two
   halves), vpmaddubsw (codes 0..15 times int8: a pair <= 3810, two pairs added <= 7620, no int16 saturation),
   vpmaddwd to int32, three vphaddd to the 8 rows' exact group sums in row order; then per row, in its lane,
   acc = fma(dot, s t, acc) and zacc = fma(z - 8 s, t sum q, zacc): the arithmetic of dot_int4, whatever R. */
static inline __attribute__((always_inline)) void int4_tile(const int R, const uint8_t *wt, int32_t groups,
        const int8_t *xq, size_t ldq, const float *gstep, const float *gsum, size_t ldg, int32_t nr, __m256 *out) {
    const int8_t *xr[4];
    const float *tr[4], *sr[4];
    __m256 acc[4], zacc[4];
    for (int r = 0; r < R; r++) {
        const size_t a = (size_t)(r < nr ? r : nr - 1);
        xr[r] = xq + a * ldq;
        tr[r] = gstep + a * ldg;
        sr[r] = gsum + a * ldg;
        acc[r] = zacc[r] = _mm256_setzero_ps();
    }
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    const __m256i high16 = _mm256_set1_epi32((int32_t)0xFFFF0000u);
    for (int32_t g = 0; g < groups; g++) {
        const uint8_t *wg = wt + (size_t)g * MU_INT4_TILE_GROUP;
        _mm_prefetch((const char *)(wg + MU_INT4_AHEAD), _MM_HINT_T0);  /* a hint: past the end it never faults */
        _mm_prefetch((const char *)(wg + MU_INT4_AHEAD + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(wg + MU_INT4_AHEAD + 128), _MM_HINT_T0);
        __m256i lo[4], hi[4];
        for (int p = 0; p < 4; p++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 32 * p));
            lo[p] = _mm256_and_si256(v, low);
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        const __m256i pair = _mm256_loadu_si256((const __m256i *)(wg + 128));
        const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
        const __m256 m = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, _mm256_castsi256_ps(_mm256_and_si256(pair, high16)));
        for (int r = 0; r < R; r++) {
            const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xr[r] + (size_t)g * MU_GROUP)));
            const __m256i xhi = _mm256_broadcastsi128_si256(
                _mm_loadu_si128((const __m128i *)(xr[r] + (size_t)g * MU_GROUP + 16)));
            __m256i q[4];
            for (int p = 0; p < 4; p++)
                q[p] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[p], xlo),
                                                          _mm256_maddubs_epi16(hi[p], xhi)), ones);
            const __m256i dot = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_broadcast_ss(tr[r] + g)), acc[r]);
            zacc[r] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(sr[r] + g), zacc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = _mm256_add_ps(acc[r], zacc[r]);
}
#else
/* The portable int4 dot product of tile row t (0 .. 7) with one activation row (quantize_groups'): exact int32
   group sums, then the AVX2 path's float arithmetic (fmaf: the same roundings with or without an FMA unit). */
static float dot_int4(const uint8_t *wt, int32_t t, int32_t groups, const int8_t *xq, const float *gstep,
                      const float *gsum) {
    const size_t part = (size_t)(t % 4) * 32 + (size_t)(t / 4) * 16;
    float acc = 0.0f, zacc = 0.0f;
    for (int32_t g = 0; g < groups; g++) {
        const uint8_t *wg = wt + (size_t)g * MU_INT4_TILE_GROUP, *c = wg + part;
        const int8_t *xg = xq + (size_t)g * MU_GROUP;
        int32_t dot = 0;
        for (int i = 0; i < 16; i++)
            dot += (int32_t)(c[i] & 15) * xg[i] + (int32_t)(c[i] >> 4) * xg[i + 16];
        uint16_t sz[2];
        memcpy(sz, wg + 128 + 4 * t, sizeof sz);
        const float s = bf16_bits(sz[0]), z = bf16_bits(sz[1]);
        acc = fmaf((float)dot, s * gstep[g], acc);
        zacc = fmaf(z - 8.0f * s, gsum[g], zacc);  /* 8 s is exact: one rounding, as the AVX2 path's fnmadd */
    }
    return acc + zacc;
}
#endif

/* `linear` for int4 weights (to_int4_tiles) on rows quantized by quantize_groups: per tile of 8 weight rows (held
   in L1 while it lasts), the activation rows MU_INT4_ROWS at a time. */
static void linear_int4(const mu_linear *L, int32_t rows, float *y, int32_t ldy, int accumulate,
                        const mu_buffers *b) {
    const int32_t n = L->n, k = L->k, groups = k / MU_GROUP;
    const size_t ldq = round_up((size_t)k), ldg = ldq / MU_GROUP, tile_bytes = (size_t)groups * MU_INT4_TILE_GROUP;
    for (int32_t j = 0; j < n; j += MU_INT4_TILE) {
        const int32_t nw = n - j < MU_INT4_TILE ? n - j : MU_INT4_TILE;
        const uint8_t *wt = (const uint8_t *)L->w + (size_t)(j / MU_INT4_TILE) * tile_bytes;
        for (int32_t r0 = 0; r0 < rows; r0 += MU_INT4_ROWS) {
            const int32_t nr = rows - r0 < MU_INT4_ROWS ? rows - r0 : MU_INT4_ROWS;
            const int8_t *xq = b->xq + (size_t)r0 * ldq;
            const float *gstep = b->gstep + (size_t)r0 * ldg, *gsum = b->gsum + (size_t)r0 * ldg;
            float out[4][MU_INT4_TILE];
#if defined(MU_AVX2)
            __m256 v[4];
            switch (nr) {
            case 1: int4_tile(1, wt, groups, xq, ldq, gstep, gsum, ldg, nr, v); break;
            case 2: int4_tile(2, wt, groups, xq, ldq, gstep, gsum, ldg, nr, v); break;
            case 3: int4_tile(3, wt, groups, xq, ldq, gstep, gsum, ldg, nr, v); break;
            default: int4_tile(4, wt, groups, xq, ldq, gstep, gsum, ldg, nr, v); break;
            }
            if (nw == MU_INT4_TILE) {  /* a whole tile: 8 outputs a vector */
                const __m256 bias = L->bias ? _mm256_loadu_ps(L->bias + j) : _mm256_setzero_ps();
                for (int32_t r = 0; r < nr; r++) {
                    float *yr = y + (size_t)(r0 + r) * ldy + j;
                    __m256 u = L->bias ? _mm256_add_ps(v[r], bias) : v[r];
                    if (accumulate)
                        u = _mm256_add_ps(_mm256_loadu_ps(yr), u);
                    _mm256_storeu_ps(yr, u);
                }
                continue;
            }
            for (int32_t r = 0; r < nr; r++)
                _mm256_storeu_ps(out[r], v[r]);
#else
            for (int32_t r = 0; r < nr; r++)
                for (int32_t t = 0; t < nw; t++)
                    out[r][t] = dot_int4(wt, t, groups, xq + (size_t)r * ldq, gstep + (size_t)r * ldg,
                                         gsum + (size_t)r * ldg);
#endif
            for (int32_t r = 0; r < nr; r++)
                for (int32_t t = 0; t < nw; t++) {
                    float u = out[r][t];
                    if (L->bias)
                        u += L->bias[j + t];
                    float *yr = y + (size_t)(r0 + r) * ldy + j + t;
                    *yr = accumulate ? *yr + u : u;
                }
        }
    }
}

/* Which int4 kernel this build runs ("avx2" or "generic"; no AVX-512 one: the AVX2 path runs there). */
const char *mu_int4_kernel(void) {
#if defined(MU_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

/* Y[r] (=, or += with `accumulate`) x[r] W^T (+ bias) for `rows` rows. int8 weights read the rows quantized
   in b->xq / step / corr (quantize_rows first); `with_step` 0 leaves the int8 outputs unscaled by the row's
   step (the greedy screen compares scores of one row, where the step changes nothing). The path depends on
   the weights only (never on `rows`), so a row's outputs are the same in any batch. */
static void linear(const mu_linear *L, int32_t rows, const float *x, int32_t ldx, float *y, int32_t ldy,
                   int accumulate, const mu_buffers *b, int with_step) {
    const int32_t n = L->n, k = L->k;
    const size_t ldq = round_up((size_t)k);
    if (L->format == MU_FORMAT_INT4) {
        linear_int4(L, rows, y, ldy, accumulate, b);
        return;
    }
#if defined(MU_AVX512)
    if (L->panels && L->scale == NULL) {
        linear_panels(L, rows, x, ldx, y, ldy, accumulate);
        return;
    }
#elif defined(MU_AVX2)
    if (L->panels && L->scale == NULL) {
        linear_panels_avx2(L, rows, x, ldx, y, ldy, accumulate);
        return;
    }
#endif
#if defined(MU_VNNI)
    if (L->scale != NULL && k % 64 == 0) {
        if (rows == 1)
            linear_tiles(16, 1, L, rows, y, ldy, accumulate, b, with_step);
        else if (rows == 2)
            linear_tiles(8, 2, L, rows, y, ldy, accumulate, b, with_step);
        else
            linear_tiles(4, 4, L, rows, y, ldy, accumulate, b, with_step);
        return;
    }
#elif defined(MU_AVX2)
    if (L->panels && L->scale != NULL) {
        linear_u8_avx2(L, rows, y, ldy, accumulate, b, with_step);
        return;
    }
#endif
    for (int32_t j = 0; j < n; j++) {
        for (int32_t r = 0; r < rows; r++) {
            float v;
            if (L->scale == NULL) {
                v = dot_f32((const float *)L->w + (size_t)j * k, x + (size_t)r * ldx, k);
            } else {
                int32_t dot = dot_u8s8((const uint8_t *)L->w + (size_t)j * k, b->xq + (size_t)r * ldq, k);
                v = (float)(dot + b->corr[r]) * L->scale[j];
                if (with_step)
                    v *= b->step[r];
            }
            if (L->bias)
                v += L->bias[j];
            float *yr = y + (size_t)r * ldy + j;
            *yr = accumulate ? *yr + v : v;
        }
    }
}

/* ------------------------------------------------------------------ parallel regions */

/* How many chunks a region of `units` independent units of work takes: one without a pool, else a few per
   thread (so a thread that runs late leaves work the others take), never more than the units. */
static int32_t chunk_count(const mu_buffers *b, int32_t units) {
    const int32_t most = b->pool == NULL ? 1 : 4 * b->pool->threads;
    return units < most ? units : most;
}

#define MU_CHUNK_BYTES (128 << 10)  /* weights a chunk of a large projection reads, at most about */

/* Chunks of a projection of `blocks` blocks of 64 outputs, `block_bytes` of weights each: chunk_count's, or more
   for a large one (the vocabulary: hundreds of blocks), so that the chunk a thread slowed down by the machine
   finishes last is short: the region waits for it. */
static int32_t linear_chunk_count(const mu_buffers *b, int32_t blocks, size_t block_bytes) {
    const int32_t few = chunk_count(b, blocks);
    if (b->pool == NULL)
        return few;
    const size_t by_size = (size_t)blocks * block_bytes / MU_CHUNK_BYTES;
    return by_size <= (size_t)few ? few : by_size < (size_t)blocks ? (int32_t)by_size : blocks;
}

typedef struct {
    const mu_linear *L;
    int32_t rows, ldx, ldy, per;  /* per: outputs per chunk, a multiple of 64 */
    const float *x;
    float *y;
    int accumulate, with_step;
    const mu_buffers *b;
} linear_job;

/* Outputs c * per .. of a linear_job: `linear` on the weights' rows for them, which computes each output with
   the instructions of the whole (a chunk starts on a float32 panel and on an int8 tile of every shape). */
static void linear_chunk(const void *ctx, int32_t c, int32_t who) {
    const linear_job *j = ctx;
    const mu_linear *L = j->L;
    const int32_t j0 = c * j->per, n = L->n - j0 < j->per ? L->n - j0 : j->per;
    mu_linear part = *L;
    (void)who;
    part.n = n;
    if (L->format == MU_FORMAT_INT4)  /* tiles of 8 rows, 5 k bytes each: j0 is a multiple of 64 */
        part.w = (const uint8_t *)L->w + (size_t)(j0 / MU_INT4_TILE) * (L->k / MU_GROUP) * MU_INT4_TILE_GROUP;
    else if (L->scale != NULL)  /* rows, or tiles of 4 rows: j0 is a multiple of 64 */
        part.w = (const uint8_t *)L->w + (size_t)j0 * L->k;
    else if (L->panels)
        part.w = (const float *)L->w + (size_t)(j0 / 64) * L->k * 64;
    else
        part.w = (const float *)L->w + (size_t)j0 * L->k;
    part.scale = L->scale ? L->scale + j0 : NULL;
    part.bias = L->bias ? L->bias + j0 : NULL;
    linear(&part, j->rows, j->x, j->ldx, j->y + j0, j->ldy, j->accumulate, j->b, j->with_step);
}

/* `linear` split over the session's threads by blocks of 64 outputs (the same numbers on any thread count). */
static void linear_threads(const mu_linear *L, int32_t rows, const float *x, int32_t ldx, float *y, int32_t ldy,
                           int accumulate, const mu_buffers *b, int with_step) {
    const size_t row_bytes = L->format == MU_FORMAT_INT4 ? (size_t)L->k / MU_GROUP * MU_INT4_TILE_GROUP / MU_INT4_TILE
                             : (size_t)L->k * (L->scale != NULL ? 1 : sizeof(float));
    const size_t block_bytes = 64 * row_bytes;
    const int32_t blocks = (L->n + 63) / 64, chunks = linear_chunk_count(b, blocks, block_bytes);
    const int32_t per = chunks > 0 ? (blocks + chunks - 1) / chunks * 64 : 64;
    const linear_job job = {L, rows, ldx, ldy, per, x, y, accumulate, with_step, b};
    run_chunks(b->pool, linear_chunk, &job, (L->n + per - 1) / per);
}

#define MU_PARALLEL_ROWS 8  /* rows from which the per-row work (norms, RoPE, activation, quantization) is split
                               over the threads too: below it (decode steps) it costs less than a region */

typedef struct {
    const mu_linear *L;
    int32_t rows, ldx, per;
    const float *x;
    mu_buffers *b;
} quantize_job;

/* Rows c * per .. of a quantize_job, through quantize_rows / quantize_groups on buffers offset to them. */
static void quantize_chunk(const void *ctx, int32_t c, int32_t who) {
    const quantize_job *j = ctx;
    const int32_t r0 = c * j->per, n = j->rows - r0 < j->per ? j->rows - r0 : j->per;
    const size_t ldq = round_up((size_t)j->L->k), ldg = ldq / MU_GROUP;
    mu_buffers part = *j->b;
    (void)who;
    part.xq += (size_t)r0 * ldq;
    if (j->L->format == MU_FORMAT_INT4) {
        part.gstep += (size_t)r0 * ldg;
        part.gsum += (size_t)r0 * ldg;
        quantize_groups(j->x + (size_t)r0 * j->ldx, n, j->L->k, j->ldx, &part);
    } else {
        part.step += r0;
        part.corr += r0;
        quantize_rows(j->x + (size_t)r0 * j->ldx, n, j->L->k, j->ldx, &part);
    }
}

/* linear() on rows x, quantizing them first (over the threads for many rows) when the weights are int8 or int4,
   over the session's threads. */
static void project(const mu_linear *L, int32_t rows, const float *x, int32_t ldx, float *y, int32_t ldy,
                    int accumulate, mu_buffers *b) {
    if (L->format == MU_FORMAT_INT4 || L->scale != NULL) {
        const int32_t chunks = rows < MU_PARALLEL_ROWS ? 1 : chunk_count(b, rows), per = (rows + chunks - 1) / chunks;
        const quantize_job job = {L, rows, ldx, per, x, b};
        run_chunks(b->pool, quantize_chunk, &job, (rows + per - 1) / per);
    }
    linear_threads(L, rows, x, ldx, y, ldy, accumulate, b, 1);
}

static void rms_norm(const float *x, const float *w, float eps, int32_t d, float *y) {
    float ss = 0.0f;
    int32_t i = 0;
#if defined(MU_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    ss = hsum8(acc);
#endif
    for (; i < d; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (i = 0; i < d; i++)
        y[i] = x[i] * r * w[i];
}

/* x * cos + roll(x, dk / 2) * rot_sin for each of `heads` vectors of dk (models.layers.apply_rotary). */
static void rope(float *x, int32_t heads, int32_t dk, const float *cos, const float *rot_sin) {
    int32_t half = dk / 2;
    for (int32_t h = 0; h < heads; h++) {
        float *v = x + (size_t)h * dk;
        for (int32_t i = 0; i < half; i++) {
            float a = v[i], c = v[i + half];
            v[i] = a * cos[i] + c * rot_sin[i];
            v[i + half] = c * cos[i + half] + a * rot_sin[i + half];
        }
    }
}

#if defined(MU_AVX512)
/* One query head over columns first..pos of its KV head's cache (kc, vc: head_dim floats a column), NV = head_dim
   / 16 vectors: scores 16 columns at a time (one reduction tree for 16 dot products), softmax with exp512,
   and the weighted sum of values kept in registers. */
static inline __attribute__((always_inline)) void attend_head(const int NV, const float *q, const float *kc,
        const float *vc, int64_t first, int64_t pos, float scale, float *scores, float *out) {
    const int32_t dk = NV * 16, n = (int32_t)(pos - first + 1);
    __m512 qv[8];
    for (int v = 0; v < NV; v++)
        qv[v] = _mm512_loadu_ps(q + 16 * v);
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 vbest = _mm512_set1_ps(-INFINITY);
    for (int32_t c0 = 0; c0 < n; c0 += 16) {
        const int32_t nc = n - c0 < 16 ? n - c0 : 16;
        __m512 acc[16];
        for (int t = 0; t < 16; t++) {
            const float *kr = kc + (first + c0 + (t < nc ? t : nc - 1)) * dk;
            acc[t] = _mm512_mul_ps(_mm512_loadu_ps(kr), qv[0]);
            for (int v = 1; v < NV; v++)
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(kr + 16 * v), qv[v], acc[t]);
        }
        const __mmask16 mask = (__mmask16)((1u << nc) - 1u);
        const __m512 sc = _mm512_mul_ps(reduce16_ps(acc), vscale);
        _mm512_mask_storeu_ps(scores + c0, mask, sc);
        vbest = _mm512_mask_max_ps(vbest, mask, vbest, sc);
    }
    const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(vbest));
    __m512 vtotal = _mm512_setzero_ps();
    for (int32_t c0 = 0; c0 < n; c0 += 16) {
        const int32_t nc = n - c0 < 16 ? n - c0 : 16;
        const __mmask16 mask = (__mmask16)((1u << nc) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + c0), best));
        _mm512_mask_storeu_ps(scores + c0, mask, e);
        vtotal = _mm512_mask_add_ps(vtotal, mask, vtotal, e);
    }
    __m512 o[8];
    for (int v = 0; v < NV; v++)
        o[v] = _mm512_setzero_ps();
    for (int32_t c = 0; c < n; c++) {
        const __m512 p = _mm512_set1_ps(scores[c]);
        const float *vr = vc + (first + c) * dk;
        for (int v = 0; v < NV; v++)
            o[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * v), o[v]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vtotal));
    for (int v = 0; v < NV; v++)
        _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(o[v], inv));
}
#endif

/* The same for any head_dim, one column at a time. */
static void attend_head_any(int32_t dk, const float *q, const float *kc, const float *vc, int64_t first,
                            int64_t pos, float scale, float *scores, float *out) {
    float best = -INFINITY;
    for (int64_t c = first; c <= pos; c++) {
        float sc = dot_attn(kc + c * dk, q, dk) * scale;
        scores[c - first] = sc;
        best = sc > best ? sc : best;
    }
    float total = 0.0f;
    for (int64_t c = first; c <= pos; c++) {
        float e = expf(scores[c - first] - best);
        scores[c - first] = e;
        total += e;
    }
    memset(out, 0, sizeof(float) * dk);
    for (int64_t c = first; c <= pos; c++) {
        const float p = scores[c - first], *vr = vc + c * dk;
        for (int32_t t = 0; t < dk; t++)
            out[t] += p * vr[t];
    }
    const float inv = 1.0f / total;
    for (int32_t t = 0; t < dk; t++)
        out[t] *= inv;
}

/* Position p of a layer: RoPE on its q and k at (column - first), its k and v written to its cache column. A
   row past its own budget (batched rows finish at different steps) may run beyond the rotary table: its
   position is clamped to the table's last row, as the torch engine clamps its rotary rows, and its outputs are
   never used. */
static void store_kv(const mu_model *m, const mu_session *s, int32_t layer, float *qkv, int64_t row,
                     int64_t column, int64_t first) {
    const int32_t H = m->heads, G = m->kv_heads, dk = m->head_dim;
    const int64_t position = column - first < m->rope_len ? column - first : m->rope_len - 1;
    float *q = qkv, *k = qkv + (size_t)H * dk, *v = k + (size_t)G * dk;
    rope(q, H, dk, m->cos + position * dk, m->rot_sin + position * dk);
    rope(k, G, dk, m->cos + position * dk, m->rot_sin + position * dk);
    for (int32_t g = 0; g < G; g++) {
        size_t base = (size_t)(layer * s->layer_stride + row * s->row_stride + g * s->head_stride);
        memcpy(s->k + base + column * dk, k + (size_t)g * dk, sizeof(float) * dk);
        memcpy(s->v + base + column * dk, v + (size_t)g * dk, sizeof(float) * dk);
    }
}

/* Query head i of a position's attention (q: its heads * head_dim floats) over columns first..column of its KV
   head in cache row `row`, into out (head_dim floats); scores: `column - first + 1` floats of scratch. */
static void attend(const mu_model *m, const mu_session *s, int32_t layer, int32_t i, const float *q, int64_t row,
                   int64_t column, int64_t first, float *out, float *scores) {
    const int32_t dk = m->head_dim, g = i / (m->heads / m->kv_heads);
    const float scale = 1.0f / sqrtf((float)dk);
    size_t base = (size_t)(layer * s->layer_stride + row * s->row_stride + g * s->head_stride);
    const float *kc = s->k + base, *vc = s->v + base, *qi = q + (size_t)i * dk;
#if defined(MU_AVX512)
    switch (dk) {
    case 16: attend_head(1, qi, kc, vc, first, column, scale, scores, out); return;
    case 32: attend_head(2, qi, kc, vc, first, column, scale, scores, out); return;
    case 48: attend_head(3, qi, kc, vc, first, column, scale, scores, out); return;
    case 64: attend_head(4, qi, kc, vc, first, column, scale, scores, out); return;
    case 96: attend_head(6, qi, kc, vc, first, column, scale, scores, out); return;
    case 128: attend_head(8, qi, kc, vc, first, column, scale, scores, out); return;
    default: break;
    }
#elif defined(MU_AVX2)
    switch (dk) {
    case 16: attend_head_avx2(2, qi, kc, vc, first, column, scale, scores, out); return;
    case 32: attend_head_avx2(4, qi, kc, vc, first, column, scale, scores, out); return;
    case 48: attend_head_avx2(6, qi, kc, vc, first, column, scale, scores, out); return;
    case 64: attend_head_avx2(8, qi, kc, vc, first, column, scale, scores, out); return;
    case 96: attend_head_avx2(12, qi, kc, vc, first, column, scale, scores, out); return;
    case 128: attend_head_avx2(16, qi, kc, vc, first, column, scale, scores, out); return;
    default: break;
    }
#endif
    attend_head_any(dk, qi, kc, vc, first, column, scale, scores, out);
}

typedef struct {
    const mu_model *m;
    const mu_session *s;
    const mu_buffers *b;
    int32_t layer, n, per;  /* per: (position, query head) pairs per chunk */
} attend_job;

/* Pairs c * per .. (position p = pair / heads, head pair % heads) of an attend_job, on thread `who`'s scores. */
static void attend_chunk(const void *ctx, int32_t c, int32_t who) {
    const attend_job *j = ctx;
    const mu_model *m = j->m;
    const mu_buffers *b = j->b;
    const int32_t H = m->heads, nqkv = (H + 2 * m->kv_heads) * m->head_dim, natt = H * m->head_dim;
    const int32_t end = (c + 1) * j->per < j->n * H ? (c + 1) * j->per : j->n * H;
    float *scores = b->scores + (size_t)who * b->scores_stride;
    for (int32_t pair = c * j->per; pair < end; pair++) {
        const int32_t p = pair / H, i = pair % H;
        attend(m, j->s, j->layer, i, b->qkv + (size_t)p * nqkv, b->row[p], b->column[p], b->first[p],
               b->att + (size_t)p * natt + (size_t)i * m->head_dim, scores);
    }
}

/* Every query head of the n positions of a layer over the session's threads. */
static void attend_threads(const mu_model *m, const mu_session *s, int32_t layer, int32_t n, const mu_buffers *b) {
    const int32_t pairs = n * m->heads, chunks = chunk_count(b, pairs), per = (pairs + chunks - 1) / chunks;
    const attend_job job = {m, s, b, layer, n, per};
    run_chunks(b->pool, attend_chunk, &job, (pairs + per - 1) / per);
}

/* f[i] = silu(f[i]) * f[d_ff + i] (SwiGLU) or gelu(f[i]) for one row. */
static void activate(const mu_model *m, float *f) {
    int32_t i = 0;
    if (m->gelu) {
        for (; i < m->d_ff; i++)
            f[i] = 0.5f * f[i] * (1.0f + erff(f[i] * 0.70710678118654752440f));
        return;
    }
#if defined(MU_AVX512)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= m->d_ff; i += 16) {
        __m512 g = _mm512_loadu_ps(f + i), u = _mm512_loadu_ps(f + m->d_ff + i);
        __m512 sig = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(f + i, _mm512_mul_ps(sig, u));
    }
#elif defined(MU_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= m->d_ff; i += 8) {
        __m256 g = _mm256_loadu_ps(f + i), u = _mm256_loadu_ps(f + m->d_ff + i);
        __m256 sig = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(f + i, _mm256_mul_ps(sig, u));
    }
#endif
    for (; i < m->d_ff; i++)
        f[i] = f[i] / (1.0f + expf(-f[i])) * f[m->d_ff + i];
}

/* ------------------------------------------------------------------ the head */

/* The largest of n values (NaN: none is larger), vectorized where AVX-512 is. */
static float max_value(const float *v, int32_t n) {
    int32_t j = 0;
    float best = -INFINITY;
#if defined(MU_AVX512)
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16)
        m = _mm512_max_ps(m, _mm512_loadu_ps(v + j));
    best = _mm512_reduce_max_ps(m);
#elif defined(MU_AVX2)
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8)
        m = _mm256_max_ps(m, _mm256_loadu_ps(v + j));
    best = hmax8(m);
#endif
    for (; j < n; j++)
        best = v[j] > best ? v[j] : best;
    return best;
}

/* The first j with v[j] == value (or, with `nan`, with v[j] a NaN); -1 if none. */
static int64_t find_first(const float *v, int32_t n, float value, int nan) {
    int32_t j = 0;
#if defined(MU_AVX512)
    const __m512 target = _mm512_set1_ps(value);
    for (; j + 16 <= n; j += 16) {
        __m512 x = _mm512_loadu_ps(v + j);
        __mmask16 hit = nan ? _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(x, target, _CMP_EQ_OQ);
        if (hit)
            return j + __builtin_ctz(hit);
    }
#elif defined(MU_AVX2)
    const __m256 target = _mm256_set1_ps(value);
    for (; j + 8 <= n; j += 8) {
        __m256 x = _mm256_loadu_ps(v + j);
        int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(x, x, _CMP_UNORD_Q) : _mm256_cmp_ps(x, target, _CMP_EQ_OQ));
        if (hit)
            return j + __builtin_ctz((unsigned)hit);
    }
#endif
    for (; j < n; j++)
        if (nan ? isnan(v[j]) : v[j] == value)
            return j;
    return -1;
}

/* Index of the largest of n values, the first on ties; a NaN counts as the largest (as torch.argmax). */
static int64_t argmax(const float *v, int32_t n) {
    int64_t j = find_first(v, n, 0.0f, 1);
    if (j >= 0)
        return j;
    j = find_first(v, n, max_value(v, n), 0);
    return j >= 0 ? j : 0;
}

/* The indices j (ascending) with v[j] >= threshold, at most `most` of them, into out; returns how many. */
static int32_t at_least(const float *v, int32_t n, float threshold, int32_t most, int32_t *out) {
    int32_t j = 0, count = 0;
#if defined(MU_AVX512)
    const __m512 t = _mm512_set1_ps(threshold);
    for (; j + 16 <= n && count < most; j += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), t, _CMP_GE_OQ);
        while (hit && count < most) {
            out[count++] = j + __builtin_ctz(hit);
            hit &= (__mmask16)(hit - 1);
        }
    }
#elif defined(MU_AVX2)
    const __m256 t = _mm256_set1_ps(threshold);
    for (; j + 8 <= n && count < most; j += 8) {
        unsigned hit = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + j), t, _CMP_GE_OQ));
        while (hit && count < most) {
            out[count++] = j + __builtin_ctz(hit);
            hit &= hit - 1;
        }
    }
#endif
    for (; j < n && count < most; j++)
        if (v[j] >= threshold)
            out[count++] = j;
    return count;
}

/* The float32 head's score of id j for the normed row h, computed as the full projection computes it (in the
   panel layout: the whole panel of 64 rows holding j, so j's lane runs the same instructions). */
static float head_score(const mu_model *m, const float *h, int32_t j, const mu_buffers *b) {
    const int32_t d = m->d;
    if (m->head.panels) {
        const int32_t p = j / 64, n = m->vocab - p * 64 < 64 ? m->vocab - p * 64 : 64;
        const mu_linear panel = {(const float *)m->head.w + (size_t)p * d * 64, NULL, NULL, n, d, 1, MU_FORMAT_PLAIN};
        float out[64];
        linear(&panel, 1, h, d, out, 64, 0, b, 0);
        return out[j % 64];
    }
    const mu_linear one = {(const float *)m->head.w + (size_t)j * d, NULL, NULL, 1, d, 0, MU_FORMAT_PLAIN};
    float score;
    linear(&one, 1, h, d, &score, 1, 0, b, 0);
    return score;
}

/* Greedy ids through the int8 screen of a float32 head (utils.weights.quant.GreedyHead): approximate scores of every
   id, a bound on their error, exact float32 scores for the ids within twice the bound of the best, and the
   full projection for a row with no or more than screen_k such ids (near-ties) or non-finite values. */
static void screened_argmax(const mu_model *m, int32_t rows, mu_buffers *b, int64_t *ids) {
    const int32_t d = m->d, V = m->vocab;
    quantize_rows(b->h, rows, d, d, b);
    linear_threads(&m->screen, rows, b->h, d, b->out, V, 0, b, 0);
    for (int32_t r = 0; r < rows; r++) {
        const float *h = b->h + (size_t)r * d, *approx = b->out + (size_t)r * V;
        float best = max_value(approx, V), l1 = 0.0f;
        for (int32_t i = 0; i < d; i++)
            l1 += fabsf(h[i]);
        float bound = (l1 * m->screen_x / b->step[r] + m->screen_c) * m->screen_slack;
        float threshold = best - 2.0f * bound;
        int32_t count = 0;
        if (isfinite(threshold))
            count = at_least(approx, V, threshold, m->screen_k + 1, b->cand);
        if (count >= 1 && count <= m->screen_k) {
            /* exact scores through `linear`, so they equal what the full projection computes */
            int32_t top = -1;
            float top_score = 0.0f;
            for (int32_t c = 0; c < count; c++) {
                const float sc = head_score(m, h, b->cand[c], b);
                if (top < 0 || sc > top_score || isnan(sc)) {
                    top_score = sc;
                    top = b->cand[c];
                    if (isnan(sc))
                        break;
                }
            }
            ids[r] = top;
        } else {
            float *full = b->out + (size_t)r * V;  /* this row's screen scores are no longer needed */
            linear_threads(&m->head, 1, h, d, full, V, 0, b, 0);
            ids[r] = argmax(full, V);
        }
    }
}

/* ------------------------------------------------------------------ the step and the prefill */

/* Every block for the n positions in b->x (position p: cache row b->row[p], column b->column[p], sequence from
   column b->first[p]); the caller has checked the rows and columns. All k/v of a layer are stored before any
   position attends, so a prefill's positions see each other causally. Leaves the normed rows in b->h. */
/* The per-position work between the projections of a layer (stage), position by position. */
typedef enum { MU_NORM1, MU_STORE_KV, MU_NORM2, MU_ACTIVATE, MU_FINAL_NORM } mu_stage;

typedef struct {
    const mu_model *m;
    const mu_session *s;
    const mu_buffers *b;
    int32_t layer, n, per;
    mu_stage stage;
} positions_job;

static void positions_chunk(const void *ctx, int32_t c, int32_t who) {
    const positions_job *j = ctx;
    const mu_model *m = j->m;
    const mu_buffers *b = j->b;
    const mu_layer *L = &m->layers[j->layer];
    const int32_t d = m->d, nqkv = (m->heads + 2 * m->kv_heads) * m->head_dim, nff = (m->gelu ? 1 : 2) * m->d_ff;
    const int32_t end = (c + 1) * j->per < j->n ? (c + 1) * j->per : j->n;
    (void)who;
    for (int32_t p = c * j->per; p < end; p++) {
        float *x = b->x + (size_t)p * d, *h = b->h + (size_t)p * d;
        switch (j->stage) {
        case MU_NORM1: rms_norm(x, L->norm1, L->eps1, d, h); break;
        case MU_STORE_KV: store_kv(m, j->s, j->layer, b->qkv + (size_t)p * nqkv, b->row[p], b->column[p], b->first[p]);
                          break;
        case MU_NORM2: rms_norm(x, L->norm2, L->eps2, d, h); break;
        case MU_ACTIVATE: activate(m, b->ff + (size_t)p * nff); break;
        case MU_FINAL_NORM: rms_norm(x, m->norm, m->eps, d, h); break;
        }
    }
}

/* A stage for the n positions: over the session's threads from MU_PARALLEL_ROWS positions (a prefill), else on
   this one. Each position's numbers are the same either way. */
static void positions(const mu_model *m, const mu_session *s, int32_t layer, int32_t n, const mu_buffers *b,
                      mu_stage stage) {
    const int32_t chunks = n < MU_PARALLEL_ROWS ? 1 : chunk_count(b, n), per = (n + chunks - 1) / chunks;
    const positions_job job = {m, s, b, layer, n, per, stage};
    run_chunks(b->pool, positions_chunk, &job, (n + per - 1) / per);
}

static void forward(const mu_model *m, const mu_session *s, int32_t n, mu_buffers *b) {
    const int32_t d = m->d, nqkv = (m->heads + 2 * m->kv_heads) * m->head_dim, natt = m->heads * m->head_dim;
    const int32_t nff = (m->gelu ? 1 : 2) * m->d_ff;
    for (int32_t l = 0; l < m->n_layers; l++) {
        const mu_layer *L = &m->layers[l];
        positions(m, s, l, n, b, MU_NORM1);
        project(&L->qkv, n, b->h, d, b->qkv, nqkv, 0, b);
        positions(m, s, l, n, b, MU_STORE_KV);
        attend_threads(m, s, l, n, b);
        project(&L->o, n, b->att, natt, b->x, d, 1, b);
        positions(m, s, l, n, b, MU_NORM2);
        project(&L->up, n, b->h, d, b->ff, nff, 0, b);
        positions(m, s, l, n, b, MU_ACTIVATE);
        project(&L->down, n, b->ff, nff, b->x, d, 1, b);
    }
    positions(m, s, 0, n, b, MU_FINAL_NORM);
}

/* The head on `rows` normed rows at h: logits (when `logits` is not NULL) and/or greedy ids (when `ids` is not
   NULL; with logits == NULL a float32 head goes through the int8 screen when the model has one). */
static void head(const mu_model *m, int32_t rows, const float *h, mu_buffers *b, float *logits, int64_t *ids) {
    if (h != b->h)
        memmove(b->h, h, sizeof(float) * (size_t)rows * m->d);
    if (logits == NULL && ids != NULL && m->head.scale == NULL && m->screen.n > 0) {
        screened_argmax(m, rows, b, ids);
        return;
    }
    float *out = logits ? logits : b->out;
    project(&m->head, rows, b->h, m->d, out, m->vocab, 0, b);
    if (ids != NULL)
        for (int32_t r = 0; r < rows; r++)
            ids[r] = argmax(out + (size_t)r * m->vocab, m->vocab);
}

/* Whether the session's pool runs its thread count (its scratch holds scores for that many threads). */
static int threads_agree(const mu_session *s) {
    return s->threads >= 1 && (s->threads == 1 ? s->pool == NULL : s->pool != NULL && s->pool->threads == s->threads);
}

/* Feed tokens[r] to row r at cache column `pos` (row r's sequence starts at column first[r]; NULL: 0) and
   produce, per row, logits (V floats) and/or the greedy id, as `head`. Returns 0, or -1 for a token outside
   the vocabulary, -2 for a column outside the cache or before a row's first, or more rows than the session, -3
   for a session whose pool does not run its thread count. */
int mu_step(const mu_model *m, const mu_session *s, int32_t rows, const int64_t *tokens, int64_t pos,
            const int64_t *first, float *logits, int64_t *ids) {
    mu_buffers b;
    if (!threads_agree(s))
        return -3;
    carve(m, s->rows, s->positions, s->columns, s->threads, s->scratch, &b);
    b.pool = s->pool;
    if (rows > s->rows || pos < 0 || pos >= s->columns)
        return -2;
    for (int32_t r = 0; r < rows; r++) {
        b.row[r] = r;
        b.column[r] = pos;
        b.first[r] = first ? first[r] : 0;
        if (tokens[r] < 0 || tokens[r] >= m->vocab)
            return -1;
        if (b.first[r] < 0 || b.first[r] > pos)
            return -2;
        memcpy(b.x + (size_t)r * m->d, m->emb + tokens[r] * m->d, sizeof(float) * m->d);
    }
    forward(m, s, rows, &b);
    head(m, rows, b.h, &b, logits, ids);
    return 0;
}

/* The prefill of one sequence: input embeddings `embeds` (n x d floats) at columns first..first+n-1 of cache row
   `row`, attending causally from column `first`. Produces the last position's logits and/or greedy id, as
   `head`. Returns 0, or -2 for columns or a row outside the cache or more positions than the session holds, -3
   as mu_step. */
int mu_prefill(const mu_model *m, const mu_session *s, int32_t row, int32_t n, const float *embeds, int64_t first,
               float *logits, int64_t *id) {
    mu_buffers b;
    if (!threads_agree(s))
        return -3;
    carve(m, s->rows, s->positions, s->columns, s->threads, s->scratch, &b);
    b.pool = s->pool;
    if (n < 1 || n > s->positions || row < 0 || row >= s->rows || first < 0 || first + n > s->columns)
        return -2;
    for (int32_t p = 0; p < n; p++) {
        b.row[p] = row;
        b.column[p] = first + p;
        b.first[p] = first;
    }
    memcpy(b.x, embeds, sizeof(float) * (size_t)n * m->d);
    forward(m, s, n, &b);
    head(m, 1, b.h + (size_t)(n - 1) * m->d, &b, logits, id);
    return 0;
}
