package csi

import "sync"

// keyLocks lets one operation at a time work on a volume: a second one
// while the first runs is answered Aborted, as CSI asks, and the
// orchestrator retries it.
type keyLocks struct {
	mu   sync.Mutex
	busy map[string]bool
}

// tryLock takes key's lock, unless an operation holds it.
func (l *keyLocks) tryLock(key string) (unlock func(), ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.busy[key] {
		return nil, false
	}
	if l.busy == nil {
		l.busy = make(map[string]bool)
	}
	l.busy[key] = true
	return func() {
		l.mu.Lock()
		delete(l.busy, key)
		l.mu.Unlock()
	}, true
}
