// Package nspawn boots a minimal Debian with systemd in a container
// (systemd-nspawn) for tests that need systemd itself as baton's service
// manager: socket units, `systemctl reload`, the fd store, MAINPID=.
//
// The root file system is built once with debootstrap and kept in a cache
// directory (RootDir); every container gets its own copy on write of it
// (an overlay mount), so a test may change anything in its root. The
// container runs in the caller's network namespace: a test that boots it
// from inside its own namespace (internal/netns) keeps its ports off the
// host's.
package nspawn

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/testkit"
)

// DefaultSuite is the Debian release the root is built from: it has
// systemd 252, the oldest the shipped units support.
const DefaultSuite = "bookworm"

// SuiteEnv overrides DefaultSuite (e.g. trixie, for a newer systemd).
const SuiteEnv = "BATON_NSPAWN_SUITE"

// CacheEnv overrides DefaultCache.
const CacheEnv = "BATON_NSPAWN_CACHE"

// DefaultCache is where built roots are kept between runs: outside any
// checkout, so that every clone and worktree shares one.
const DefaultCache = "/var/cache/baton-test"

// variant and packages are what debootstrap installs: the smallest root
// that boots systemd with a D-Bus for systemctl.
const variant = "minbase"

var packages = []string{"systemd", "systemd-sysv", "dbus"}

// recipeVersion changes whenever what RootDir builds changes in a way
// the suite and packages do not show.
const recipeVersion = "1"

// Suite is the Debian release to build: $BATON_NSPAWN_SUITE, else
// DefaultSuite.
func Suite() string {
	if s := os.Getenv(SuiteEnv); s != "" {
		return s
	}
	return DefaultSuite
}

// RootDir returns the path of the cached root for suite, building it
// first if it is not there. Concurrent calls, from other processes too,
// take turns through a lock: the first builds, the others wait and find
// its root. A build goes to a temporary directory renamed into place at
// the end, so a killed build leaves nothing that looks finished. ctx
// bounds the wait and the build; logf, if not nil, is told what takes
// time.
func RootDir(ctx context.Context, suite string, logf func(string, ...any)) (string, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	base := os.Getenv(CacheEnv)
	if base == "" {
		base = DefaultCache
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return "", fmt.Errorf("nspawn: root cache: %w", err)
	}
	name := recipe(suite)
	root := filepath.Join(base, name)
	if complete(root) {
		return root, nil
	}
	unlock, err := lock(ctx, filepath.Join(base, name+".lock"), func() {
		logf("nspawn: waiting for another process building %s", root)
	})
	if err != nil {
		return "", err
	}
	defer unlock()
	if complete(root) {
		return root, nil
	}
	// Leftovers of a build that was killed, its mounts first.
	olds, _ := filepath.Glob(filepath.Join(base, name+".tmp-*"))
	for _, old := range olds {
		unmountUnder(old)
		if err := os.RemoveAll(old); err != nil {
			return "", fmt.Errorf("nspawn: remove an unfinished build: %w", err)
		}
	}
	_ = os.RemoveAll(root) // incomplete: no marker
	tmp, err := os.MkdirTemp(base, name+".tmp-")
	if err != nil {
		return "", fmt.Errorf("nspawn: %w", err)
	}
	defer func() {
		unmountUnder(tmp)
		os.RemoveAll(tmp)
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", fmt.Errorf("nspawn: %w", err)
	}
	logPath := filepath.Join(base, name+".log")
	args := []string{"--variant=" + variant, "--include=" + strings.Join(packages, ","), suite, tmp}
	if m := hostMirror(); m != "" {
		args = append(args, m)
	}
	logf("nspawn: building the %s root in %s (debootstrap %s; output in %s)", suite, root, strings.Join(args, " "), logPath)
	start := time.Now()
	logFile, err := os.Create(logPath)
	if err != nil {
		return "", fmt.Errorf("nspawn: %w", err)
	}
	defer logFile.Close()
	cmd := exec.CommandContext(ctx, "debootstrap", args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nspawn: debootstrap %s after %s: %w (ctx: %v); last lines of %s:\n%s",
			strings.Join(args, " "), time.Since(start).Round(time.Second), err, context.Cause(ctx), logPath, tail(logPath, 20))
	}
	if err := prepare(tmp); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, marker), []byte(strings.Join(args, " ")+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("nspawn: %w", err)
	}
	if err := os.Rename(tmp, root); err != nil {
		return "", fmt.Errorf("nspawn: %w", err)
	}
	logf("nspawn: built %s in %s", root, time.Since(start).Round(time.Second))
	return root, nil
}

// marker is written into a root once it is complete.
const marker = ".baton-root-complete"

func complete(root string) bool {
	_, err := os.Stat(filepath.Join(root, marker))
	return err == nil
}

// recipe names a root by what it is built from.
func recipe(suite string) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00%s", recipeVersion, suite, variant, strings.Join(packages, ","))
	return "debian-" + suite + "-" + hex.EncodeToString(h.Sum(nil))[:12]
}

// prepare makes a fresh root boot quietly and fast in a container: no
// getty on the container's console, which no one reads.
func prepare(root string) error {
	for _, unit := range []string{"console-getty.service", "getty@.service", "systemd-networkd-wait-online.service"} {
		link := filepath.Join(root, "etc/systemd/system", unit)
		if err := os.Symlink("/dev/null", link); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("nspawn: mask %s: %w", unit, err)
		}
	}
	return nil
}

// hostMirror returns the Debian mirror this machine's apt uses, or "" to
// leave debootstrap its default: on a Debian host, the URI of the apt
// source that serves the host's own release (not -updates or -security).
func hostMirror() string {
	osr, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return ""
	}
	var id, codename string
	for _, line := range strings.Split(string(osr), "\n") {
		k, v, _ := strings.Cut(line, "=")
		v = strings.Trim(v, `"`)
		switch k {
		case "ID":
			id = v
		case "VERSION_CODENAME":
			codename = v
		}
	}
	if id != "debian" || codename == "" {
		return ""
	}
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	for _, f := range files {
		if m := mirrorFromDeb822(f, codename); m != "" {
			return m
		}
	}
	files, _ = filepath.Glob("/etc/apt/sources.list.d/*.list")
	for _, f := range append([]string{"/etc/apt/sources.list"}, files...) {
		if m := mirrorFromList(f, codename); m != "" {
			return m
		}
	}
	return ""
}

func usableURI(u string) bool {
	return strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://")
}

// mirrorFromDeb822 reads a .sources file (sources.list(5), deb822 style).
func mirrorFromDeb822(path, codename string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, stanza := range strings.Split(string(b), "\n\n") {
		fields := map[string][]string{}
		for _, line := range strings.Split(stanza, "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok || strings.HasPrefix(k, " ") {
				continue
			}
			fields[strings.ToLower(strings.TrimSpace(k))] = strings.Fields(v)
		}
		if !slices.Contains(fields["types"], "deb") || !slices.Contains(fields["suites"], codename) {
			continue
		}
		if en := fields["enabled"]; len(en) > 0 && en[0] == "no" {
			continue
		}
		for _, u := range fields["uris"] {
			if usableURI(u) {
				return u
			}
		}
	}
	return ""
}

// mirrorFromList reads a one-line-style sources.list.
func mirrorFromList(path, codename string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(line)
		if len(fields) < 3 || fields[0] != "deb" {
			continue
		}
		fields = fields[1:]
		if strings.HasPrefix(fields[0], "[") {
			for len(fields) > 0 && !strings.HasSuffix(fields[0], "]") {
				fields = fields[1:]
			}
			if len(fields) > 0 {
				fields = fields[1:]
			}
		}
		if len(fields) >= 2 && fields[1] == codename && usableURI(fields[0]) {
			return fields[0]
		}
	}
	return ""
}

// lock takes an exclusive flock on path, waiting as long as ctx allows;
// waiting is called once if it has to wait.
func lock(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	unlock, err = testkit.LockFile(ctx, path, waiting)
	if err != nil {
		return nil, fmt.Errorf("nspawn: %w", err)
	}
	return unlock, nil
}

// unmountUnder detaches every mount at or below dir (debootstrap mounts
// /proc and /sys in its target while it configures packages), deepest
// first.
func unmountUnder(dir string) {
	var points []string
	for _, m := range mounts() {
		if m == dir || strings.HasPrefix(m, dir+"/") {
			points = append(points, m)
		}
	}
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	for _, p := range points {
		_ = unix.Unmount(p, unix.MNT_DETACH)
	}
}

// mounts lists the mount points of this process's mount namespace.
func mounts() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 {
			out = append(out, unescape(f[4]))
		}
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// SystemdVersion is the major version of the systemd package installed in
// root, read from dpkg's database so that no container has to boot.
func SystemdVersion(root string) (int, error) {
	f, err := os.Open(filepath.Join(root, "var/lib/dpkg/status"))
	if err != nil {
		return 0, fmt.Errorf("nspawn: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	inSystemd := false
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			inSystemd = false
		case line == "Package: systemd":
			inSystemd = true
		case inSystemd && strings.HasPrefix(line, "Version: "):
			v := strings.TrimPrefix(line, "Version: ")
			if _, after, ok := strings.Cut(v, ":"); ok {
				v = after // an epoch
			}
			var major int
			if _, err := fmt.Sscanf(v, "%d", &major); err != nil {
				return 0, fmt.Errorf("nspawn: systemd version %q: %w", v, err)
			}
			return major, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("nspawn: read dpkg status: %w", err)
	}
	return 0, errors.New("nspawn: systemd is not installed in " + root)
}
