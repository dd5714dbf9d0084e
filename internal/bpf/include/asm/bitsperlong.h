/* See types.h in this directory. */
#include <asm-generic/bitsperlong.h>
