/* The kernel UAPI headers reach for <asm/...>, which only exists in the
 * host's multiarch include directory. BPF is its own architecture, so point
 * at the generic definitions instead; this keeps the build independent of
 * the host (x86_64, arm64, ...) and the objects byte-for-byte reproducible. */
#include <asm-generic/types.h>
