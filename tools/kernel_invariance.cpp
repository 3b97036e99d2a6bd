// Is a row of mul_mat(W, X) the same, bit for bit, whatever the number of rows X has?  For each weight
// format: row j of a product over n rows (n = 1..100) against the product over row j alone, on the
// kernels ggml picks for the weight's buffer (its extra buffers first: AMX, repacked), in reference mode
// (ggml_backend_cpu_set_use_ref: what llama_set_batch_invariant sets, patch 0007) or not ("fast").
//
//   g++ -O2 -std=c++17 tools/kernel_invariance.cpp -Ibuild/patched/include -Lbuild/patched/lib \
//       -lggml -lggml-base -Wl,-rpath,$PWD/build/patched/lib -o build/kernel_invariance
//   build/kernel_invariance ref|fast [libggml-cpu-<variant>.so]
//
// With a variant module (a -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON build of the patched tree:
// haswell = AVX2, skylakex = AVX512, sapphirerapids = AMX) it checks that CPU level's kernels on this
// machine.  Prints per format the buffer, "ok" or the count of differing values per row count, and ms.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static const int K = 2048, N = 512, MAX_ROWS = 100;

// the first extra buffer type whose kernels take a product with this weight format, else the plain one
static ggml_backend_buffer_type_t weight_buft(ggml_backend_dev_t dev, ggml_type type, const char ** name) {
    auto get = (ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t))
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    for (auto * p = get ? get(dev) : nullptr; p && *p; ++p) {
        ggml_init_params ip = { 8 * ggml_tensor_overhead(), nullptr, true };
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * w = ggml_new_tensor_2d(ctx, type, K, N);
        ggml_tensor * y = ggml_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, 4));
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(*p, ggml_nbytes(w) + 4096);
        w->buffer = buf;
        const bool ok = ggml_backend_dev_supports_op(dev, y);
        w->buffer = nullptr;
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
        if (ok) {
            *name = ggml_backend_buft_name(*p);
            return *p;
        }
    }
    *name = "CPU";
    return ggml_backend_dev_buffer_type(dev);
}

int main(int argc, char ** argv) {
    const bool use_ref = argc > 1 && std::string(argv[1]) == "ref";
    ggml_backend_reg_t reg;
    if (argc > 2) {
        reg = ggml_backend_load(argv[2]);
    } else {
        ggml_backend_load_all();
        reg = ggml_backend_dev_backend_reg(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    }
    if (reg == nullptr) {
        fprintf(stderr, "no CPU backend\n");
        return 1;
    }
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    ((void (*)(ggml_backend_t, int)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"))(backend, 2);
    ((void (*)(ggml_backend_t, bool)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref"))(backend, use_ref);

    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> wf((size_t) K * N), xf((size_t) K * MAX_ROWS);
    for (auto & v : wf) v = normal(rng) * 0.05f;
    for (auto & v : xf) v = normal(rng) * 3.0f;

    printf("mode %s\n", use_ref ? "ref" : "fast");
    const ggml_type types[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0,
                                GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
                                GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS };
    int failures = 0;
    for (ggml_type type : types) {
        const char * buft_name;
        ggml_backend_buffer_type_t buft = weight_buft(dev, type, &buft_name);
        ggml_init_params ip = { 4 * ggml_tensor_overhead(), nullptr, true };
        ggml_context * wctx = ggml_init(ip);
        ggml_tensor * w = ggml_new_tensor_2d(wctx, type, K, N);
        ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
        std::vector<uint8_t> q(ggml_row_size(type, K) * N);
        ggml_quantize_chunk(type, wf.data(), q.data(), 0, N, K, nullptr);
        ggml_backend_tensor_set(w, q.data(), 0, q.size());  // an extra buffer repacks here

        // y = W x over the first `rows` rows of x; the mean time of `reps` runs
        auto product = [&](int rows, const float * x, float * y, int reps) {
            ggml_init_params gp = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
            ggml_context * ctx = ggml_init(gp);
            ggml_tensor * xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, rows);
            ggml_tensor * yt = ggml_mul_mat(ctx, w, xt);
            ggml_cgraph * graph = ggml_new_graph(ctx);
            ggml_build_forward_expand(graph, yt);
            ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
            ggml_backend_tensor_set(xt, x, 0, sizeof(float) * K * rows);
            const auto t0 = std::chrono::steady_clock::now();
            for (int r = 0; r < reps; r++) {
                ggml_backend_graph_compute(backend, graph);
            }
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
            ggml_backend_tensor_get(yt, y, 0, sizeof(float) * N * rows);
            ggml_backend_buffer_free(buf);
            ggml_free(ctx);
            return ms;
        };
        std::vector<float> alone((size_t) N * MAX_ROWS), together((size_t) N * MAX_ROWS);
        for (int j = 0; j < MAX_ROWS; j++) {
            product(1, xf.data() + (size_t) K * j, alone.data() + (size_t) N * j, 1);
        }
        printf("%-7s %-10s", ggml_type_name(type), buft_name);
        for (int rows : { 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 100 }) {
            product(rows, xf.data(), together.data(), 1);
            const int differ = (int) std::count_if(together.begin(), together.begin() + (size_t) N * rows,
                [&](const float & v) { return memcmp(&v, &alone[&v - together.data()], sizeof v) != 0; });
            failures += differ > 0;
            printf(differ ? " %d:%d" : " %d:ok", rows, differ);
        }
        std::vector<float> y((size_t) N * MAX_ROWS);
        printf("  | ms: 1 row %.3f, 8 rows %.3f, 64 rows %.3f\n", product(1, xf.data(), y.data(), 50),
               product(8, xf.data(), y.data(), 50), product(64, xf.data(), y.data(), 50));
        ggml_backend_buffer_free(wbuf);
        ggml_free(wctx);
    }
    ggml_backend_free(backend);
    return failures ? 2 : 0;
}
