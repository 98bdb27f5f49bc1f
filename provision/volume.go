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

// LookupVolume looks the key a volume owner named name would attach up in
// the image source, as Attach does, without attaching: nil if it exists
// for the volume owner. The error wraps imageconfig.ErrNotFound for a key
// the source does not hold, and is a ConcealedError showing it for a key
// the source keeps from volume owners without disclosing it.
func (m *Manager) LookupVolume(name string) error {
	image, err := m.cfg.Images.Lookup(name)
	if err != nil {
		return err
	}
	return authorizeCaller(VolumeCaller, name, image)
}
