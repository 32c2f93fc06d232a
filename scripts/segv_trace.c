// A crash tracer for the GPU machine, which has no debugger: LD_PRELOAD it and a SIGSEGV,
// SIGBUS or SIGABRT prints the faulting thread's native stack (library and offset per frame,
// for addr2line) and the fault address to stderr, then dies with the same signal.
// Build: cc -O1 -shared -fPIC -o /tmp/segv_trace.so scripts/segv_trace.c
// Run without `python -X faulthandler`, which would replace the handler.
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char alt_stack[1 << 16];

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void) context;
    char line[160];
    int n = snprintf(line, sizeof line, "segv_trace: signal %d at address %p, thread %ld\n", sig,
                     info ? info->si_addr : NULL, (long) gettid());
    if (write(2, line, (size_t) n) < 0) {
        // nothing to do: stderr is gone
    }
    void *frames[64];
    int depth = backtrace(frames, 64);
    backtrace_symbols_fd(frames, depth, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    stack_t ss = { .ss_sp = alt_stack, .ss_size = sizeof alt_stack, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGABRT, &sa, NULL);
}
