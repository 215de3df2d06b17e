#!/bin/sh
# Install nats-server (with JetStream) from Debian's package when missing, as root (as CI runs).
# Without it the tests under tests/events skip and say why.
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
	exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	apt-get install -y -q nats-server >/dev/null 2>&1 ||
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nats-server >/dev/null 2>&1; } || true
fi
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
	echo "nats-server not installed: tests/events skip their real-broker tests"
fi
exit 0
