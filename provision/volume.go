package provision

// Volume finds the attachment a volume owner named name holds on this
// host, as a restart adopts it too.
func (m *Manager) Volume(name string) (Info, bool) {
	if name == "" {
		return Info{}, false
	}
	for _, info := range m.reg.snapshot() {
		if info.Owner == OwnerVolume && info.Volume == name {
			return info, true
		}
	}
	return Info{}, false
}
