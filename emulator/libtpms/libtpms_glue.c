#include <libtpms/tpm_library.h>
#include "_cgo_export.h"

/* const-correct trampolines from libtpms' callback types to the Go exports */
static TPM_RESULT nv_init(void) { return goNvInit(); }
static TPM_RESULT nv_load(unsigned char **d, uint32_t *l, uint32_t n, const char *name) {
	return goNvLoad(d, l, n, (char *)name);
}
static TPM_RESULT nv_store(const unsigned char *d, uint32_t l, uint32_t n, const char *name) {
	return goNvStore((unsigned char *)d, l, n, (char *)name);
}
static TPM_RESULT nv_delete(uint32_t n, const char *name, TPM_BOOL mustExist) {
	return goNvDelete(n, (char *)name, mustExist);
}
static TPM_RESULT io_init(void) { return TPM_SUCCESS; }
static TPM_RESULT io_getlocality(TPM_MODIFIER_INDICATOR *loc, uint32_t n) {
	(void)n;
	*loc = goLocality();
	return TPM_SUCCESS;
}

int vtpmd_register_callbacks(void) {
	struct libtpms_callbacks cbs = {
		.sizeOfStruct = sizeof(struct libtpms_callbacks),
		.tpm_nvram_init = nv_init,
		.tpm_nvram_loaddata = nv_load,
		.tpm_nvram_storedata = nv_store,
		.tpm_nvram_deletename = nv_delete,
		.tpm_io_init = io_init,
		.tpm_io_getlocality = io_getlocality,
	};
	return TPMLIB_RegisterCallbacks(&cbs);
}
