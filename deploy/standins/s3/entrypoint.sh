#!/bin/sh
if [ "$1" = server ]; then exec moto_server -H 0.0.0.0 -p 9000; fi
exec "$@"
