#!/usr/bin/env bash
# vmtest/run.sh [-run REGEX] [packages]: run the VM integration tests, as "make integration"
# does. The work is done by the Go runner in vmtest/vmrun (vmtest/run.sh -h lists the knobs);
# this script only builds it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH=$PATH:/usr/local/go/bin
"${GO:-go}" build -o .cache/vmrun ./vmtest/vmrun
exec .cache/vmrun "$@"
