package account

import (
	"os/user"
	"slices"
	"strings"
	"testing"
)

func TestNamesAndNumbers(t *testing.T) {
	root, err := user.LookupId("0")
	if err != nil {
		t.Fatalf("this machine has no uid 0 entry: %v", err)
	}
	rootGroup, err := user.LookupGroupId("0")
	if err != nil {
		t.Fatalf("this machine has no gid 0 entry: %v", err)
	}
	for _, c := range []struct {
		name string
		f    func(string) (int, error)
		in   string
		want int
		err  string
	}{
		{"uid by name", UID, root.Username, 0, ""},
		{"uid by number", UID, "0", 0, ""},
		{"uid without an entry", UID, "4000000000", 4000000000, ""},
		{"gid by name", GID, rootGroup.Name, 0, ""},
		{"gid by number", GID, "65534", 65534, ""},
		{"unknown user", UID, "no-such-user-baton", 0, `user "no-such-user-baton"`},
		{"unknown group", GID, "no-such-group-baton", 0, `group "no-such-group-baton"`},
		{"negative gid", GID, "-1", 0, `group "-1"`},
		{"reserved uid", UID, "4294967295", 0, `user "4294967295"`},
		{"too large", GID, "4294967296", 0, `group "4294967296"`},
	} {
		got, err := c.f(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: %q gave %d, %v; want an error naming %s", c.name, c.in, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: %q gave %d, %v; want %d", c.name, c.in, got, err, c.want)
		}
	}
}

func TestUser(t *testing.T) {
	for _, in := range []string{"0", "root"} {
		u, err := User(in)
		if err != nil || u.Uid != "0" {
			t.Errorf("User(%q) = %+v, %v", in, u, err)
			continue
		}
		if gs := Groups(u); !slices.Contains(gs, 0) {
			t.Errorf("Groups(root) = %v, want the root group among them", gs)
		}
	}
	// A number with no passwd entry is refused: the caller needs its
	// primary group.
	if _, err := User("4000000000"); err == nil || !strings.Contains(err.Error(), `user "4000000000"`) {
		t.Errorf("User of a uid without an entry: %v", err)
	}
	if _, err := User("no-such-user-baton"); err == nil {
		t.Error("User of an unknown name succeeded")
	}
}
