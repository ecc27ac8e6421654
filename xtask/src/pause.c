/* The sandbox ("pause") container of the test nodes' pods: it holds the
 * pod's namespaces and does nothing until SIGINT or SIGTERM ends it. Built
 * with `gcc -static` by `cargo xtask` (image::pause_image), so its image
 * needs no libraries. */
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void die(int s){ (void)s; _exit(0); }
int main(void){ signal(SIGINT, die); signal(SIGTERM, die); for(;;) pause(); }
