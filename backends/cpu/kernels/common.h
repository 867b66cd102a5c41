/* Definitions every kernel header shares. */
#ifndef ZEPHYR_COMMON_H
#define ZEPHYR_COMMON_H

#include <stdint.h>

/* `restrict` is C99 but not C++/MSVC; both gcc and MSVC accept __restrict. */
#define ZD_RESTRICT __restrict

#endif
