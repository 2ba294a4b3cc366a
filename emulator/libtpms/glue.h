#include <stddef.h>
#include <stdint.h>

int vtpmd_register_callbacks(void);
void vtpmd_engine_init(void);
void vtpmd_engine_lock(void);
void vtpmd_engine_lock_keep(void);
void vtpmd_engine_unlock(int arm);
void vtpmd_set_last_cc(uint32_t cc);
uint32_t vtpmd_last_cc(void);
void vtpmd_set_locality(uint32_t l);
uint32_t vtpmd_locality(void);
int vtpmd_send_all(int fd, const unsigned char *b, size_t n);
int vtpmd_start_data_thread(int fd, uintptr_t handle, size_t cap, const uint32_t *to_go, size_t n_to_go);
