/* A no-op milter on libmilter: the floor of the milter protocol.
 *
 * It hooks what heloguard hooks (connect, helo, envfrom, envrcpt, close),
 * declines the same callbacks in negotiation (headers, body, unknown, data;
 * connect without a reply), and answers CONTINUE to everything.
 * Built by bench/protocol.py:  cc -O2 -o noop noop.c -lmilter -lpthread
 * Run:  noop unix:/path/to/socket
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static sfsistat on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1,
                             unsigned long f2, unsigned long f3, unsigned long *pf0,
                             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
    (void)ctx; (void)f0; (void)f2; (void)f3;
    *pf0 = 0;
    *pf1 = f1 & (SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_NOUNKNOWN |
                 SMFIP_NODATA | SMFIP_NR_CONN | SMFIP_NR_HDR);
    *pf2 = *pf3 = 0;
    return SMFIS_CONTINUE;
}
static sfsistat on_connect(SMFICTX *c, char *h, _SOCK_ADDR *a) { (void)c; (void)h; (void)a; return SMFIS_CONTINUE; }
static sfsistat on_helo(SMFICTX *c, char *h) { (void)c; (void)h; return SMFIS_CONTINUE; }
static sfsistat on_envfrom(SMFICTX *c, char **v) { (void)c; (void)v; return SMFIS_CONTINUE; }
static sfsistat on_envrcpt(SMFICTX *c, char **v) { (void)c; (void)v; return SMFIS_CONTINUE; }
static sfsistat on_close(SMFICTX *c) { (void)c; return SMFIS_CONTINUE; }

int main(int argc, char **argv) {
    struct smfiDesc desc;
    if (argc != 2) {
        fprintf(stderr, "usage: %s unix:/path\n", argv[0]);
        return 64;
    }
    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = "noop";
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_connect = on_connect;
    desc.xxfi_helo = on_helo;
    desc.xxfi_envfrom = on_envfrom;
    desc.xxfi_envrcpt = on_envrcpt;
    desc.xxfi_close = on_close;
    desc.xxfi_negotiate = on_negotiate;
    if (smfi_setconn(argv[1]) == MI_FAILURE || smfi_register(desc) == MI_FAILURE) {
        fprintf(stderr, "noop: cannot set up %s\n", argv[1]);
        return 1;
    }
    smfi_setbacklog(4096);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
