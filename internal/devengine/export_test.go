package devengine

// SetSyncHook lets external tests see which image files Shutdown fsynced.
func SetSyncHook(s *Server, hook func(imageID string)) { s.syncHook = hook }
