//go:build linux

// Command example-client attaches an image through mvps-provisioner and
// holds it until Enter or a signal:
//
//	example-client [--check] <socket> <image_key>
//	example-client --mount DIR <socket> <image_key>
//
// It prints the device's path and size. With --check it reads the last
// block, writes the same bytes back and reads them again: a read/write
// round trip through the engine that leaves the data as it was. With
// --mount the provisioner mounts the image's ext4 on DIR in this process's
// mount namespace instead; on exit the client unmounts it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

func main() {
	check := flag.Bool("check", false, "do a non-destructive read/write check of the last block")
	mountDir := flag.String("mount", "", "mount the image's file system on this directory instead of receiving the device")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: example-client [--check | --mount DIR] <socket> <image_key> | --version")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *showVersion {
		fmt.Println("example-client", version.Get())
		return
	}
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	run := func(socket, key string, check bool) error { return runDevice(socket, key, check) }
	if *mountDir != "" {
		run = func(socket, key string, _ bool) error { return runMount(socket, key, *mountDir) }
	}
	if err := run(flag.Arg(0), flag.Arg(1), *check); err != nil {
		fmt.Fprintln(os.Stderr, "example-client:", err)
		os.Exit(1)
	}
}

func runDevice(socket, key string, check bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	a, err := protocol.Attach(ctx, socket, key)
	cancel()
	if err != nil {
		return err
	}
	defer a.Close()

	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", a.Device.Fd()))
	if err != nil {
		return fmt.Errorf("resolve device path: %w", err)
	}
	size, err := unix.IoctlGetUint64(int(a.Device.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return fmt.Errorf("device size: %w", err)
	}
	fmt.Printf("device %s size %d\n", path, size)

	if check {
		if err := readWriteCheck(a.Device, size); err != nil {
			return err
		}
		fmt.Println("read/write check: OK")
	}

	return hold(a)
}

func runMount(socket, key, dir string) error {
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	defer ns.Close()
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	a, err := protocol.AttachMount(ctx, socket, key, ns, d)
	cancel()
	if err != nil {
		return err
	}
	defer a.Close()
	fmt.Printf("mounted %s at %s\n", key, dir)
	err = hold(a)
	// Lazily: the provisioner holds the file system until the connection
	// closes, and syncs it then.
	if uerr := unix.Unmount(dir, unix.MNT_DETACH); uerr != nil && err == nil {
		err = fmt.Errorf("unmount %s: %w", dir, uerr)
	}
	return err
}

// hold keeps the attachment until Enter, a signal, or the provisioner
// going away.
func hold(a *protocol.Attachment) error {
	fmt.Println("holding the attachment; press Enter or send SIGTERM to detach")
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	enter := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(enter)
	}()
	gone := make(chan error, 1)
	go func() { gone <- a.Wait(context.Background()) }()
	select {
	case <-sigs:
	case <-enter:
	case err := <-gone:
		return fmt.Errorf("attachment ended: %w", err)
	}
	fmt.Println("detaching")
	return nil
}

func readWriteCheck(dev *os.File, size uint64) error {
	const block = 4096 // the device's block size
	if size < block {
		return errors.New("device smaller than one block")
	}
	off := int64(size - block)
	orig := make([]byte, block)
	if _, err := dev.ReadAt(orig, off); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if _, err := dev.WriteAt(orig, off); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	// Drop the page cache so the read below goes to the engine.
	if err := unix.IoctlSetInt(int(dev.Fd()), unix.BLKFLSBUF, 0); err != nil {
		return fmt.Errorf("drop cache: %w", err)
	}
	again := make([]byte, block)
	if _, err := dev.ReadAt(again, off); err != nil {
		return fmt.Errorf("read back: %w", err)
	}
	if !bytes.Equal(orig, again) {
		return errors.New("read back differs from what was written")
	}
	return nil
}
