//go:build !linux

package main

import "syscall"

// dieWithParent: only Linux has a parent-death signal; vmrun runs VMs on Linux hosts.
func dieWithParent() *syscall.SysProcAttr { return nil }
