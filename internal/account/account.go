// Package account resolves the user and group names an operator writes
// (--user, --group, a Unix listener's owner and group, --control-group):
// a name is looked up, a number is taken as the id it is.
package account

import (
	"fmt"
	"math"
	"os/user"
	"strconv"
)

// User resolves a user name or uid to its passwd entry. A uid must have
// an entry too: whoever asks needs its primary group and group list.
func User(s string) (*user.User, error) {
	if _, err := parseID(s); err == nil {
		u, err := user.LookupId(s)
		if err != nil {
			return nil, fmt.Errorf("user %q: %w", s, err)
		}
		return u, nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return nil, fmt.Errorf("user %q: %w", s, err)
	}
	return u, nil
}

// UID resolves a user name or uid to a uid.
func UID(s string) (int, error) {
	if n, err := parseID(s); err == nil {
		return n, nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("user %q: %w", s, err)
	}
	return idOf("user", s, u.Uid)
}

// GID resolves a group name or gid to a gid.
func GID(s string) (int, error) {
	if n, err := parseID(s); err == nil {
		return n, nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("group %q: %w", s, err)
	}
	return idOf("group", s, g.Gid)
}

// Groups returns the ids of the groups u belongs to, its primary group
// included; nil if the group database cannot say.
func Groups(u *user.User) []uint32 {
	ids, err := u.GroupIds()
	if err != nil {
		return nil
	}
	var out []uint32
	for _, s := range ids {
		if n, err := strconv.ParseUint(s, 10, 32); err == nil {
			out = append(out, uint32(n))
		}
	}
	return out
}

// parseID accepts the decimal ids the kernel does: 0 to 2^32-2 (the
// all-ones value means "no id" to chown and setresuid).
func parseID(s string) (int, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, err
	}
	if n == math.MaxUint32 {
		return 0, fmt.Errorf("id %d is reserved", n)
	}
	return int(n), nil
}

func idOf(kind, name, id string) (int, error) {
	n, err := parseID(id)
	if err != nil {
		return 0, fmt.Errorf("%s %q: database gives id %q: %w", kind, name, id, err)
	}
	return n, nil
}
