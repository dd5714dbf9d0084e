package config

import (
	"strings"
	"testing"
)

func TestParseMPTCP(t *testing.T) {
	for _, c := range []struct {
		arg     string
		mptcp   bool
		wantErr string
	}{
		{arg: "h=tcp://:80?mptcp=1", mptcp: true},
		{arg: "h=tcp://:80?mptcp=true&backlog=10", mptcp: true},
		{arg: "h=tcp://:80?mptcp=0"},
		{arg: "h=tcp://:80"},
		{arg: "h=tcp://:80?mptcp=yes", wantErr: "mptcp=\"yes\" must be 1 or 0"},
		{arg: "h=udp://:80?mptcp=1", wantErr: "not known for udp"},
		{arg: "h=unix:///run/x.sock?mptcp=1", wantErr: "not known for unix"},
	} {
		l, err := ParseListen(c.arg)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%s: err = %v, want containing %q", c.arg, err, c.wantErr)
			}
			continue
		}
		if err != nil || l.MPTCP != c.mptcp {
			t.Errorf("%s: MPTCP %v err %v, want %v", c.arg, l.MPTCP, err, c.mptcp)
		}
	}
	a, _ := ParseListen("h=tcp://:80")
	b, _ := ParseListen("h=tcp://:80?mptcp=1")
	if a.Same(b) {
		t.Errorf("mptcp=1 is the same listener as plain tcp")
	}
}

func mustListeners(t *testing.T, args ...string) []Listener {
	t.Helper()
	var out []Listener
	for _, a := range args {
		l, err := ParseListen(a)
		if err != nil {
			t.Fatalf("%s: %v", a, err)
		}
		out = append(out, l)
	}
	return out
}

// TestDiffListeners: every kind of change, and every change that cannot
// be applied, with the reason.
func TestDiffListeners(t *testing.T) {
	type want struct {
		name string
		kind ListenerChangeKind
		same bool
	}
	for _, c := range []struct {
		what      string
		cur, next []string
		want      []want
		wantErr   string
	}{
		{what: "nothing", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:80?steer=on"},
			want: []want{{"h", ListenerKept, false}}},
		{what: "add", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:80", "x=unix:///run/x.sock"},
			want: []want{{"h", ListenerKept, false}, {"x", ListenerAdded, false}}},
		{what: "remove", cur: []string{"h=tcp://:80", "q=quic://:443"}, next: []string{"h=tcp://:80"},
			want: []want{{"h", ListenerKept, false}, {"q", ListenerRemoved, false}}},
		{what: "add udp", cur: nil, next: []string{"q=quic://:443"},
			want: []want{{"q", ListenerAdded, false}}},
		{what: "backlog", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:80?backlog=64"},
			want: []want{{"h", ListenerRelisten, false}}},
		{what: "mptcp backlog", cur: []string{"h=tcp://:80?mptcp=1"}, next: []string{"h=tcp://:80?mptcp=1&backlog=64"},
			want: []want{{"h", ListenerRelisten, false}}},
		{what: "unix backlog", cur: []string{"u=unix:///run/u.sock"}, next: []string{"u=unix:///run/u.sock?backlog=9"},
			want: []want{{"u", ListenerRelisten, false}}},
		{what: "tcp to mptcp", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:80?mptcp=1"},
			want: []want{{"h", ListenerReplaced, true}}},
		{what: "mptcp to tcp", cur: []string{"h=tcp://:80?mptcp=1"}, next: []string{"h=tcp://:80"},
			want: []want{{"h", ListenerReplaced, true}}},
		{what: "steer off", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:80?steer=off"},
			want: []want{{"h", ListenerReplaced, true}}},
		{what: "steer on", cur: []string{"h=tcp://:80?steer=off"}, next: []string{"h=tcp://:80"},
			want: []want{{"h", ListenerReplaced, true}}},
		{what: "address", cur: []string{"h=tcp://:80"}, next: []string{"h=tcp://:81"},
			want: []want{{"h", ListenerReplaced, false}}},
		{what: "tcp to unix", cur: []string{"h=tcp://:80"}, next: []string{"h=unix:///run/h.sock"},
			want: []want{{"h", ListenerReplaced, false}}},
		{what: "unix path", cur: []string{"u=unix:///run/a.sock"}, next: []string{"u=unix:///run/b.sock"},
			want: []want{{"u", ListenerReplaced, false}}},
		{what: "reorder", cur: []string{"a=tcp://:80", "b=tcp://:81"}, next: []string{"b=tcp://:81", "a=tcp://:80"},
			want: []want{{"b", ListenerKept, false}, {"a", ListenerKept, false}}},

		{what: "udp change", cur: []string{"q=quic://:443"}, next: []string{"q=quic://:443?workers=2"}, wantErr: "UDP, QUIC or xdp listener cannot change"},
		{what: "tcp to udp", cur: []string{"h=tcp://:80"}, next: []string{"h=udp://:80"}, wantErr: "UDP, QUIC or xdp listener cannot change"},
		{what: "unix mode", cur: []string{"u=unix:///run/u.sock"}, next: []string{"u=unix:///run/u.sock?mode=0600"}, wantErr: "mode, owner or group"},
		{what: "v6only", cur: []string{"h=tcp://[::]:80"}, next: []string{"h=tcp://[::]:80?v6only=true"}, wantErr: "v6only"},
		{what: "shared to mptcp", cur: []string{"h=tcp://:80?steer=off"}, next: []string{"h=tcp://:80?mptcp=1"}, wantErr: "restart once with tcp://:80 (steered) in between"},
		{what: "address of another", cur: []string{"a=tcp://:80", "b=tcp://:81"}, next: []string{"a=tcp://:81"}, wantErr: "which listener b"},
		{what: "added at another's address", cur: []string{"a=tcp://:80"}, next: []string{"b=tcp://:80"}, wantErr: "which listener a"},
	} {
		cs, err := DiffListeners(mustListeners(t, c.cur...), mustListeners(t, c.next...))
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%s: err = %v, want containing %q", c.what, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.what, err)
			continue
		}
		var got []want
		for _, ch := range cs {
			name := ch.New.Name
			if ch.Kind == ListenerRemoved {
				name = ch.Old.Name
			}
			got = append(got, want{name, ch.Kind, ch.SameAddress})
		}
		if len(got) != len(c.want) {
			t.Errorf("%s: got %v, want %v", c.what, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: change %d = %v, want %v", c.what, i, got[i], c.want[i])
			}
		}
		if Changed(cs) != (c.what != "nothing") {
			t.Errorf("%s: Changed = %v", c.what, Changed(cs))
		}
	}
}
