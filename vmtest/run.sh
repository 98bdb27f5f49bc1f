#!/usr/bin/env bash
# vmtest/run.sh [-run REGEX] [packages]: run the VM integration tests, as "make integration"
# does. The work is done by the Go runner in vmtest/vmrun (go run ./vmtest/vmrun -h for the
# knobs); this script only finds the repository and a go command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH=$PATH:/usr/local/go/bin
exec "${GO:-go}" run ./vmtest/vmrun "$@"
