
run-1c-1 *docker.io/library/busybox:1.36