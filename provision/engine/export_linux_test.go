package engine

// stopReadingLogs makes e's run stop reading the engine's output, as a run
// that died would.
func (e *Process) stopReadingLogs() {
	for _, f := range e.logFiles {
		f.Close()
	}
}
