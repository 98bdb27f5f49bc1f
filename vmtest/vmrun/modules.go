package main

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
)

// modSpec is a kernel module the guest needs: its name, the parameters to load it with, and
// whether a kernel that lacks it is fine.
type modSpec struct {
	Name     string
	Params   string
	Optional bool
}

// modLoad is one insmod in the guest: the module's path relative to lib/modules/<ver>.
type modLoad struct {
	Path   string
	Params string
	Src    string // the host file to copy when not the module dir's Path: a decompressed copy
}

// modIndex is what depmod wrote about one kernel: modules.dep, modules.softdep, modules.alias
// and modules.builtin.
type modIndex struct {
	byName  map[string]string   // module name -> path
	deps    map[string][]string // path -> dependency paths (all of them, as depmod lists them)
	softPre map[string][]string // module name -> names or aliases to load first
	alias   map[string][]string // exact alias -> module names
	builtin map[string]bool     // module names built into the kernel
}

// modName turns a module path or name into the kernel's name for it: the base name without
// .ko (and a compression suffix), with '-' as '_'.
func modName(p string) string {
	b := path.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// parseModIndex reads the depmod files; softdep, alias and builtin may be nil.
func parseModIndex(dep, softdep, alias, builtin io.Reader) (*modIndex, error) {
	ix := &modIndex{
		byName:  map[string]string{},
		deps:    map[string][]string{},
		softPre: map[string][]string{},
		alias:   map[string][]string{},
		builtin: map[string]bool{},
	}
	err := eachLine(dep, func(line string) error {
		mod, deps, ok := strings.Cut(line, ":")
		if !ok {
			return fmt.Errorf("modules.dep: no ':' in %q", line)
		}
		mod = strings.TrimSpace(mod)
		ix.byName[modName(mod)] = mod
		ix.deps[mod] = strings.Fields(deps)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// softdep NAME pre: A B post: C
	err = eachLine(softdep, func(line string) error {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "softdep" {
			return nil
		}
		pre := false
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					n := modName(f[1])
					ix.softPre[n] = append(ix.softPre[n], w)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(alias, func(line string) error {
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "alias" || strings.ContainsAny(f[1], "*?[") {
			return nil // wildcard aliases match devices, not the names softdeps use
		}
		ix.alias[f[1]] = append(ix.alias[f[1]], modName(f[2]))
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = eachLine(builtin, func(line string) error {
		ix.builtin[modName(line)] = true
		return nil
	})
	return ix, err
}

func eachLine(r io.Reader, fn func(string) error) error {
	if r == nil {
		return nil
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := fn(line); err != nil {
			return err
		}
	}
	return sc.Err()
}

// resolve lists the modules to insmod for specs, in load order: for each module its soft
// "pre:" dependencies (through modules.alias, as modprobe does; missing ones are skipped),
// then its dependencies from modules.dep, each with their own, then the module itself. Each
// module is listed once. required lists the names that must be loaded in the end (not the
// optional or built-in ones).
func (ix *modIndex) resolve(specs []modSpec) (loads []modLoad, required []string, err error) {
	seen := map[string]bool{}
	var visit func(p, params string, depth int) error
	visit = func(p, params string, depth int) error {
		if seen[p] {
			return nil
		}
		if depth > 64 {
			return fmt.Errorf("module dependencies of %s are too deep (a cycle?)", p)
		}
		seen[p] = true
		name := modName(p)
		for _, soft := range ix.softPre[name] {
			for _, n := range ix.candidates(soft) {
				if sp, ok := ix.byName[n]; ok && n != name {
					if err := visit(sp, "", depth+1); err != nil {
						return err
					}
				}
			}
		}
		deps := ix.deps[p]
		// depmod lists the deepest dependencies last; modprobe loads from the end.
		for i := len(deps) - 1; i >= 0; i-- {
			if _, ok := ix.deps[deps[i]]; !ok {
				return fmt.Errorf("module %s needs %s, which modules.dep does not list", p, deps[i])
			}
			if err := visit(deps[i], "", depth+1); err != nil {
				return err
			}
		}
		loads = append(loads, modLoad{Path: p, Params: params})
		return nil
	}
	for _, s := range specs {
		name := modName(s.Name)
		if ix.builtin[name] {
			continue
		}
		p, ok := ix.byName[name]
		if !ok {
			if s.Optional {
				continue
			}
			return nil, nil, fmt.Errorf("kernel module %s: not in modules.dep", s.Name)
		}
		if seen[p] && s.Params != "" {
			return nil, nil, fmt.Errorf("kernel module %s: parameters %q, but it is already loaded as a dependency of an earlier module", s.Name, s.Params)
		}
		if err := visit(p, s.Params, 0); err != nil {
			return nil, nil, err
		}
		if !s.Optional && !slices.Contains(required, name) {
			required = append(required, name)
		}
	}
	return loads, required, nil
}

// candidates maps a soft dependency (a module name or an alias) to module names.
func (ix *modIndex) candidates(soft string) []string {
	if _, ok := ix.byName[modName(soft)]; ok {
		return []string{modName(soft)}
	}
	return ix.alias[soft]
}

// parseModSpecs reads "name[?] [param=value ...]" items: a trailing ? marks a module that a
// kernel may lack.
// withParams appends module parameters given as modprobe writes them on a kernel command line
// ("nbd.max_part=0") to the spec of that module; a later value of a parameter wins, as the
// kernel applies them in order.
func withParams(specs []modSpec, params []string) ([]modSpec, error) {
	for _, p := range params {
		mod, param, ok := strings.Cut(p, ".")
		if !ok || mod == "" || !strings.Contains(param, "=") || strings.HasPrefix(param, "=") {
			return nil, fmt.Errorf("module parameter %q is not module.param=value", p)
		}
		i := slices.IndexFunc(specs, func(s modSpec) bool { return s.Name == mod })
		if i < 0 {
			return nil, fmt.Errorf("module parameter %q: module %s is not loaded (VM_MODULES)", p, mod)
		}
		specs[i].Params = strings.TrimSpace(specs[i].Params + " " + param)
	}
	return specs, nil
}

func parseModSpecs(items []string) []modSpec {
	var specs []modSpec
	for _, it := range items {
		f := strings.Fields(it)
		if len(f) == 0 {
			continue
		}
		s := modSpec{Name: f[0], Params: strings.Join(f[1:], " ")}
		if strings.HasSuffix(s.Name, "?") {
			s.Name, s.Optional = strings.TrimSuffix(s.Name, "?"), true
		}
		specs = append(specs, s)
	}
	return specs
}
