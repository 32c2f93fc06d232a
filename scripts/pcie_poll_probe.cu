// Does a GPU polling pinned host memory slow the CPU's reads from DRAM?
//
// During a busy hand-off the worker's CPU team reads the cold experts from DRAM while the GPU's
// collect kernel waits for the answer: thread 0 of each block reads the slot's `ans` word over
// PCIe, sleeps 100 ns and reads again. The cold graph alone (scripts/cpu_moe_probe.c) runs
// 20-35 us faster than in the product on the same machine; this probe times the CPU side of
// that picture with and without the GPU's polling, nothing else.
//
// Each call: THREADS OpenMP threads read MB megabytes (one contiguous share each) from a random
// place in a 4 GiB buffer, then the main thread spins GAP_US (the GPU's part of a layer).
// Rows: no kernel; a kernel whose BLOCKS blocks poll a word of pinned, mapped host memory,
// with a 100 ns sleep between reads (the collect kernel's loop) and without it.
//
//   nvcc -O3 -arch=sm_90 -Xcompiler -fopenmp,-march=native scripts/pcie_poll_probe.cu -o /tmp/pcie_poll_probe
//   /tmp/pcie_poll_probe [THREADS=15] [MB=11.4] [GAP_US=80]
#include <cuda_runtime.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)

static __global__ void k_poll(const volatile uint32_t * flag, int sleep_ns, unsigned long long * polls) {
    if (threadIdx.x != 0) {
        return;
    }
    unsigned long long n = 0;
    while (*flag == 0) {
        if (sleep_ns > 0) {
            __nanosleep(sleep_ns);
        }
        n++;
    }
    atomicAdd(polls, n);
}

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// one call: every thread sums its contiguous share of [base, base + bytes)
static uint64_t read_once(const uint64_t * base, size_t words, int n_threads) {
    uint64_t total = 0;
#pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        const int t = omp_get_thread_num();
        const size_t lo = words * t / n_threads, hi = words * (t + 1) / n_threads;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        size_t i = lo;
        for (; i + 4 <= hi; i += 4) {
            s0 += base[i]; s1 += base[i + 1]; s2 += base[i + 2]; s3 += base[i + 3];
        }
        for (; i < hi; i++) {
            s0 += base[i];
        }
        total += s0 + s1 + s2 + s3;
    }
    return total;
}

int main(int argc, char ** argv) {
    const int n_threads = argc > 1 ? atoi(argv[1]) : 15;
    const double mb = argc > 2 ? atof(argv[2]) : 11.4;
    const double gap_us = argc > 3 ? atof(argv[3]) : 80.0;
    if (n_threads < 1 || n_threads > 512 || mb <= 0 || mb > 512 || gap_us < 0 || gap_us > 1e5) {
        fprintf(stderr, "usage: %s [THREADS 1..512] [MB 0..512] [GAP_US 0..100000]\n", argv[0]);
        return 2;
    }
    const size_t pool = (size_t) 4 << 30;
    const size_t bytes = (size_t) (mb * 1e6) & ~(size_t) 63;
    uint64_t * buf = (uint64_t *) aligned_alloc(4096, pool);
    if (buf == nullptr) {
        fprintf(stderr, "could not allocate 4 GiB\n");
        return 1;
    }
#pragma omp parallel for num_threads(n_threads)
    for (size_t i = 0; i < pool / 8; i++) {
        buf[i] = i * 2654435761u;
    }
    uint32_t * flag = nullptr;
    CHECK(cudaHostAlloc((void **) &flag, 4096, cudaHostAllocMapped | cudaHostAllocPortable));
    uint32_t * flag_dev = nullptr;
    CHECK(cudaHostGetDevicePointer((void **) &flag_dev, flag, 0));
    unsigned long long * polls = nullptr;
    CHECK(cudaMalloc(&polls, sizeof *polls));
    cudaStream_t stream;
    CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    struct row { const char * name; int blocks; int sleep_ns; };
    const row rows[] = {
        { "no kernel         ", 0, 0 },
        { "poll  1 block 100ns", 1, 100 },
        { "poll  8 blocks 100ns", 8, 100 },
        { "poll 64 blocks 100ns", 64, 100 },
        { "poll  8 blocks 0ns ", 8, 0 },
        { "poll  8 blocks 2us ", 8, 2000 },
    };
    const int n_calls = 600, rounds = 2;
    uint64_t sink = 0;
    unsigned int r = 12345u;
    for (int round = 0; round < rounds; round++) {
        for (const row & rw : rows) {
            volatile uint32_t * vflag = flag;
            *vflag = 0;
            CHECK(cudaMemset(polls, 0, sizeof *polls));
            if (rw.blocks > 0) {
                k_poll<<<rw.blocks, 32, 0, stream>>>(flag_dev, rw.sleep_ns, polls);
                CHECK(cudaGetLastError());
            }
            std::vector<double> t(n_calls);
            const double t_start = now_us();
            for (int c = 0; c < n_calls; c++) {
                r = r * 1103515245u + 12345u;
                const size_t off = ((size_t) (r >> 4) % ((pool - bytes) / 4096)) * 4096;
                const double t0 = now_us();
                sink += read_once(buf + off / 8, bytes / 8, n_threads);
                t[c] = now_us() - t0;
                const double g0 = now_us();
                while (now_us() - g0 < gap_us) {
                }
            }
            const double wall = now_us() - t_start;
            *vflag = 1;
            CHECK(cudaStreamSynchronize(stream));
            unsigned long long n_polls = 0;
            CHECK(cudaMemcpy(&n_polls, polls, sizeof n_polls, cudaMemcpyDeviceToHost));
            std::sort(t.begin(), t.end());
            const double med = t[n_calls / 2];
            printf("round %d  %s  threads=%d MB=%.2f gap=%.0f us: median %.1f us, p10 %.1f, p90 %.1f, %.1f GB/s; "
                   "%.2f M GPU reads of host memory per s\n",
                   round + 1, rw.name, n_threads, bytes / 1e6, gap_us, med, t[n_calls / 10], t[n_calls * 9 / 10],
                   bytes / med / 1e3, n_polls / wall);
        }
    }
    printf("(checksum %llu)\n", (unsigned long long) sink);
    return 0;
}
