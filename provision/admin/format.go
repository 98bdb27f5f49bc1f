package admin

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"
)

// WriteStatus prints st for people: the attachments as a table, then the
// engine, then the foreign devices.
func WriteStatus(w io.Writer, st *Status) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tIMAGE ID\tDEVICE\tMODE\tSTATE\tPID\tUID\tSINCE\tRECONNECTS\tREAD\tWRITTEN\tIN FLIGHT")
	for _, a := range st.Attachments {
		read, written, inFlight := "-", "-", "-"
		if a.IO != nil {
			read = fmt.Sprintf("%s/%d", sizeOf(a.IO.ReadBytes), a.IO.ReadIOs)
			written = fmt.Sprintf("%s/%d", sizeOf(a.IO.WriteBytes), a.IO.WriteIOs)
			inFlight = strconv.FormatUint(a.IO.InFlight, 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%d\t%s\t%s\t%s\n",
			dash(a.Key), a.ImageID, dash(a.Device), dash(a.Mode), a.State, a.CallerPID, a.CallerUID,
			since(st.Time, a.Since), a.Reconnects, read, written, inFlight)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.Attachments) == 0 {
		fmt.Fprintln(w, "(no attachments)")
	}
	for _, a := range st.Attachments {
		if a.Lease == "" {
			continue
		}
		suspended := ""
		if a.Suspended {
			suspended = "; I/O SUSPENDED until a renewal succeeds"
		}
		fmt.Fprintf(w, "lease of %s: %s, held by %s, renewed %s ago%s\n", a.ImageID, a.Lease, a.LeaseHolder,
			since(st.Time, a.LeaseRenewed), suspended)
	}
	e := st.Engine
	answering := "answering"
	if !e.Answering {
		answering = "NOT answering"
		if e.Error != "" {
			answering += ": " + e.Error
		}
	}
	fmt.Fprintf(w, "\ndaemon: mvps-provisioner %s\n", st.Daemon)
	fmt.Fprintf(w, "engine: pid %d, up since %s (%s), %d restarts, %s\n", e.PID,
		e.Since.Local().Format(time.RFC3339), since(st.Time, e.Since), e.Restarts, answering)
	if st.OwnPIDNamespace {
		fmt.Fprintln(w, "\nwarning: the daemon runs in a PID namespace of its own: callers outside it show as pid 0, and after "+
			"a restart their attachments are kept until detached (run it in the host's PID namespace: hostPID)")
	}
	if len(st.Foreign) > 0 {
		fmt.Fprintln(w, "\nconnected mvps devices this provisioner does not own:")
		for _, d := range st.Foreign {
			fmt.Fprintf(w, "  %s\t%s\n", d.Device, d.Backend)
		}
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// since is the age of t at now, to the second.
func since(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return now.Sub(t).Round(time.Second).String()
}

func sizeOf(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
