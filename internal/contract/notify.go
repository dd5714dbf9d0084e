package contract

import "strings"

// ReadyLine alone on a line of the inheritance pipe says that the
// generation serves, like READY=1.
const ReadyLine = "READY"

// Keys of the sd_notify-style assignments, "KEY=VALUE", that a generation
// sends one per line on the inheritance pipe or in a NOTIFY_SOCKET
// datagram (sd_notify(3)).
const (
	// KeyReady=1: the generation serves.
	KeyReady = "READY"
	// KeyStatus=text: free-form status the supervisor shows.
	KeyStatus = "STATUS"
	// KeyStopping=1: the generation has begun to drain.
	KeyStopping = "STOPPING"
	// KeyIdle=1 is baton's own: a draining generation has no more work.
	// With UDP listeners the supervisor then ends the drain once the
	// generation's sockets are quiet.
	KeyIdle = "IDLE"
)

// FlagOn is the value that sets a boolean key, as in READY=1.
const FlagOn = "1"

// ParseNotifyLine splits one line of a notify message into its key and
// value. ok is false for a line that is no assignment: without "=", or
// with an empty key. The value is taken as it is, spaces included.
func ParseNotifyLine(line string) (key, value string, ok bool) {
	key, value, ok = strings.Cut(line, "=")
	if !ok || key == "" {
		return "", "", false
	}
	return key, value, true
}
