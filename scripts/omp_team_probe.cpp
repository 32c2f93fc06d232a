// Does a second OpenMP team, made by another live thread, slow the first team's parallel
// regions? (The CPU worker's takeover makes exactly that: docs/benchmarks.md, sixth lease.)
//
//   g++ -O2 -fopenmp scripts/omp_team_probe.cpp -o /tmp/omp_team_probe && /tmp/omp_team_probe [THREADS] [GAP_US]
//
// THREADS: the team size (default: the CPU count); GAP_US: the master's busy time between
// regions (default 100, about one split layer's GPU share). It prints the mean cost of an
// empty region with one team, then after a second live thread has made its own team.
#include <omp.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

using steady = std::chrono::steady_clock;

static std::atomic<long> sink{0};

static void busy_for(int us) {
    const auto t0 = steady::now();
    while (steady::now() - t0 < std::chrono::microseconds(us)) {
    }
}

static double mean_region_us(int n_threads, int n, int gap_us) {
    double total = 0;
    for (int i = 0; i < n; ++i) {
        busy_for(gap_us);
        const auto t0 = steady::now();
#pragma omp parallel num_threads(n_threads)
        { sink += omp_get_thread_num(); }
        total += std::chrono::duration<double, std::micro>(steady::now() - t0).count();
    }
    return total / n;
}

int main(int argc, char ** argv) {
    const int n_threads = argc > 1 ? std::atoi(argv[1]) : omp_get_num_procs();
    const int gap_us = argc > 2 ? std::atoi(argv[2]) : 100;
    mean_region_us(n_threads, 100, gap_us);  // warm the team
    std::printf("one team of %d, %d us between regions: %.1f us per region\n", n_threads, gap_us,
                mean_region_us(n_threads, 2000, gap_us));
    std::atomic<bool> done{false};
    std::thread other([&] {
#pragma omp parallel num_threads(n_threads)
        { sink += 1; }
        while (!done) {  // stays alive, so libgomp keeps its team's threads
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::printf("with a second live team of %d:  %.1f us per region\n", n_threads,
                mean_region_us(n_threads, 2000, gap_us));
    done = true;
    other.join();
    return 0;
}
