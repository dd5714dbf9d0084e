package cli

import (
	"fmt"
	"io"
	"unicode/utf8"
)

// terminalSafe wraps a command's output so that no text a supervisor
// relays (a generation's stderr in a failure, its STATUS= line, a crash
// report) can drive the reader's terminal: a generation running as an
// unprivileged user could otherwise clear root's screen, print a fake
// "ok" and hide the rest. Control characters other than newline and tab,
// DEL, the C1 controls and the bidirectional overrides are written as
// \uXXXX, which also keeps JSON output valid and its meaning unchanged.
func terminalSafe(w io.Writer) io.Writer { return &safeWriter{w: w} }

type safeWriter struct {
	w       io.Writer
	partial []byte // the start of a rune that the next Write completes
}

func (s *safeWriter) Write(p []byte) (int, error) {
	in := append(s.partial, p...)
	s.partial = nil
	out := make([]byte, 0, len(in))
	for i := 0; i < len(in); {
		r, size := utf8.DecodeRune(in[i:])
		if r == utf8.RuneError && size <= 1 {
			if !utf8.FullRune(in[i:]) {
				s.partial = append(s.partial, in[i:]...)
				break
			}
			out = fmt.Appendf(out, `\x%02x`, in[i])
			i++
			continue
		}
		if unsafeRune(r) {
			out = fmt.Appendf(out, `\u%04x`, r)
		} else {
			out = append(out, in[i:i+size]...)
		}
		i += size
	}
	if _, err := s.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

func unsafeRune(r rune) bool {
	switch {
	case r == '\n' || r == '\t':
		return false
	case r < 0x20 || r == 0x7f:
		return true
	case r >= 0x80 && r <= 0x9f:
		return true
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true
	}
	return false
}
