package provision

// StateRecord is a state record, for the tests of Adopt that plant records
// as an earlier run (or an attacker) would have left them.
type StateRecord = stateEntry

// WriteRecord writes e as the attach pipeline does.
func (d *StateDir) WriteRecord(e StateRecord) error { return d.write(e) }

// FailIndexWrites makes every write of a device's index into its record
// fail with err from now on.
func (d *StateDir) FailIndexWrites(err error) { d.indexFault.Store(&err) }

// Records reads the records as Adopt does.
func (d *StateDir) Records() ([]StateRecord, []error) { return d.list() }

// ProcessStart is the start time that a record names a caller by.
var ProcessStart = processStart
