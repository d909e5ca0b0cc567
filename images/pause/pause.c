/* The pod sandbox's init process for scripts/cluster-up.sh: holds the pod's namespaces open,
 * reaps orphaned children (it is PID 1 when the pod shares its PID namespace) and exits on
 * SIGINT/SIGTERM. Written for this project (a registry's pause image is not reachable here);
 * built static by scripts/cluster-up.sh so the image needs no libc. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) {
  (void)sig;
  _exit(0);
}

static void on_child(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  struct sigaction term, child;
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("hetlora-pause 1");
    return 0;
  }
  memset(&term, 0, sizeof term);
  term.sa_handler = on_term;
  memset(&child, 0, sizeof child);
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0) {
    perror("sigaction");
    return 1;
  }
  for (;;) pause();
}
