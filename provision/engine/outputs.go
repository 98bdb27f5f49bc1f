package engine

import (
	"fmt"
	"io"
	"os"
)

// outputs are the engine's stdout and stderr (its side) and what the
// provisioner reads them from (its side).
type outputs struct {
	stdoutW, stderrW *os.File
	readers          map[string]io.Reader
	ours             []*os.File
}

// openOutputs makes the engine's outputs: a pipe per stream, or, with
// fifo set, a FIFO per stream at that prefix (openFIFO).
func openOutputs(fifo string) (*outputs, error) {
	if fifo != "" {
		return openFIFO(fifo)
	}
	// Pipes of our own rather than StdoutPipe: if the engine is never
	// started, closing them is all there is to release.
	stdout, stdoutW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	stderr, stderrW, err := os.Pipe()
	if err != nil {
		stdout.Close()
		stdoutW.Close()
		return nil, err
	}
	return &outputs{stdoutW: stdoutW, stderrW: stderrW,
		readers: map[string]io.Reader{"stdout": stdout, "stderr": stderr}, ours: []*os.File{stdout, stderr}}, nil
}

// closeWriters closes our copies of the engine's side.
func (o *outputs) closeWriters() {
	for _, w := range []*os.File{o.stdoutW, o.stderrW} {
		if w != nil {
			w.Close()
		}
	}
}

// closeAll closes everything opened so far.
func (o *outputs) closeAll() {
	o.closeWriters()
	o.closeReaders()
}

func (o *outputs) closeReaders() {
	for _, f := range o.ours {
		f.Close()
	}
}

// errNoFIFO: the engine's log FIFO is not there, or not a FIFO.
var errNoFIFO = fmt.Errorf("engine log FIFO missing")
