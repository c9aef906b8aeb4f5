
build-1img-1 2@
(ARG TAG
FROM busybox:${TAG}
RUN echo hi
ctx-1"
TAG1.360<B
127.0.0.1:5000u"sJ-127.0.0.1:5000/imagemesh/builds/default:img-1R€âÏªjdefault