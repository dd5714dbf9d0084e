package run

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloudflare/tableflip"
)

const (
	roleFlipParent = "flip-parent"
	roleFlipChild  = "flip-child"
)

// flipParent is the supervisor being replaced: it upgrades to a fresh
// copy of this binary with tableflip, after writing down the
// environment the copy is started with.
func flipParent(out string) int {
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: time.Minute})
	if err != nil {
		fmt.Fprintln(os.Stderr, "tableflip.New:", err)
		return 1
	}
	defer upg.Stop()
	// tableflip upgrades only a process that is ready itself.
	if err := upg.Ready(); err != nil {
		fmt.Fprintln(os.Stderr, "ready:", err)
		return 1
	}
	if err := os.Setenv(roleEnv, roleFlipChild); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := writeEnviron(filepath.Join(out, "parent.env"), os.Environ()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Ready takes effect in tableflip's own goroutine: an Upgrade right
	// after it may still find the process not ready.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		err := upg.Upgrade()
		if err == nil {
			return 0
		}
		if err.Error() != "process is not ready yet" || time.Now().After(deadline) {
			fmt.Fprintln(os.Stderr, "upgrade:", err)
			return 1
		}
	}
}

// flipChild is the new supervisor: it sets up upgrades as baton run
// does, writes down the environment its generations would inherit, and
// reports ready to the parent.
func flipChild(out string) int {
	upg, err := setUpUpgrades(OSEnv(), time.Minute)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer upg.Stop()
	if !upg.HasParent() {
		fmt.Fprintln(os.Stderr, "tableflip did not recognise its child")
		return 1
	}
	if err := writeEnviron(filepath.Join(out, "child.env"), os.Environ()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := upg.Ready(); err != nil {
		fmt.Fprintln(os.Stderr, "ready:", err)
		return 1
	}
	// Stay until the parent has taken the ready message and exited: a
	// child that exits at once races its own ready message, and the
	// parent may see the exit first and fail the upgrade.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := upg.WaitForParent(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "wait for the parent:", err)
		return 1
	}
	return 0
}

func writeEnviron(path string, env []string) error {
	return os.WriteFile(path, []byte(strings.Join(env, "\x00")), 0o600)
}

func readEnviron(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env := strings.Split(string(b), "\x00")
	slices.Sort(env)
	return env
}

// TestUpgradeMarkerNotInherited performs a real tableflip upgrade from
// one process of this test binary to another and checks that the new
// supervisor, once it has set up upgrades, has the very environment its
// predecessor started it with: whatever variable tableflip adds to mark
// its child is gone, so generations cannot inherit it. If tableflip
// renames its private marker, tableflipSentinel no longer removes it and
// this test fails.
func TestUpgradeMarkerNotInherited(t *testing.T) {
	out := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"="+roleFlipParent, outDirEnv+"="+out)
	cmd.WaitDelay = 10 * time.Second
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("upgrade: %v\n%s", err, b)
	}
	parent := readEnviron(t, filepath.Join(out, "parent.env"))
	child := readEnviron(t, filepath.Join(out, "child.env"))
	var added, lost []string
	for _, kv := range child {
		if _, found := slices.BinarySearch(parent, kv); !found {
			added = append(added, kv)
		}
	}
	for _, kv := range parent {
		if _, found := slices.BinarySearch(child, kv); !found {
			lost = append(lost, kv)
		}
	}
	if len(added) > 0 {
		t.Errorf("the new supervisor keeps %q from tableflip: has tableflip renamed its marker? tableflipSentinel is %q", added, tableflipSentinel)
	}
	if len(lost) > 0 {
		t.Errorf("the new supervisor lost %q from its environment", lost)
	}
}

// TestSetUpUpgrades: the marker is removed once the upgrader has read it,
// the timeout is passed on, and a failure to set up is returned.
func TestSetUpUpgrades(t *testing.T) {
	p := newFakeProcess(map[string]string{tableflipSentinel: "yes", "KEEP": "1"})
	upg, err := setUpUpgrades(p.env(), 42*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if upg != p.upg || p.upgOpts.UpgradeTimeout != 42*time.Second {
		t.Errorf("upgrader %v with options %+v", upg, p.upgOpts)
	}
	if _, ok := p.lookup(tableflipSentinel); ok {
		t.Errorf("%s still set", tableflipSentinel)
	}
	if v, _ := p.lookup("KEEP"); v != "1" {
		t.Error("another variable was touched")
	}

	p = newFakeProcess(nil)
	p.upgErr = errors.New("only a single Upgrader allowed")
	if _, err := setUpUpgrades(p.env(), time.Second); err == nil || !strings.Contains(err.Error(), "single Upgrader") {
		t.Errorf("err = %v", err)
	}
}
