package provision

// IdleSpares is how many engine connections wait for an attach.
func (s *Server) IdleSpares() int { return s.spares.Idle() }
