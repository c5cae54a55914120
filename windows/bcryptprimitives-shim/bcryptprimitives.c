/*
 * bcryptprimitives.dll shim for running Rust Windows binaries under Wine 8.
 *
 * Why: Rust's std (1.78+) gets its random bytes (HashMap seeds, ...) from
 * ProcessPrng in bcryptprimitives.dll, which every Windows since 10 exports. Wine 8.0 (Debian
 * 12's wine64) does not implement it, so a Rust .exe fails to start under that Wine with an
 * unresolved import. This DLL exports ProcessPrng and forwards to RtlGenRandom
 * (advapi32!SystemFunction036), which Wine has always implemented.
 *
 * Test infrastructure only: it is never shipped with Outrigger, and real Windows (Server 2016
 * and later) has its own bcryptprimitives.dll. scripts/windows-test.sh builds it with
 *   x86_64-w64-mingw32-gcc -O2 -shared -o bcryptprimitives.dll \
 *       bcryptprimitives.c bcryptprimitives.def -ladvapi32
 * and installs it into the Wine prefix with a native-first DLL override.
 */
#include <windows.h>

/* RtlGenRandom's real name; <ntsecapi.h> declares it only as a macro. */
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

/* BOOL ProcessPrng(PBYTE pbData, SIZE_T cbData): documented to always return TRUE. */
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    /* RtlGenRandom takes a ULONG (32-bit) length: feed it in chunks. */
    while (len > 0) {
        ULONG chunk = len > 0x40000000u ? 0x40000000u : (ULONG)len;
        if (!SystemFunction036(data, chunk)) {
            /* The real ProcessPrng cannot fail; a caller has no way to handle it either. */
            RaiseException(0xC00000E5 /* STATUS_INTERNAL_ERROR */, EXCEPTION_NONCONTINUABLE, 0, NULL);
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
