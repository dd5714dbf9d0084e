package testkit

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
)

// SyncBuffer is an io.Writer that several writers and readers may use at
// once: a process's stdout and stderr, or a log handler and the test that
// reads what it logged. Its zero value is ready to use.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// Tail returns the last n lines, after a line that counts the ones left
// out, for failure reports that must stay readable.
func (s *SyncBuffer) Tail(n int) string {
	all := strings.Split(strings.TrimRight(s.String(), "\n"), "\n")
	if len(all) > n {
		all = append([]string{fmt.Sprintf("... (%d earlier lines)", len(all)-n)}, all[len(all)-n:]...)
	}
	return strings.Join(all, "\n")
}

// Lines returns the non-empty lines that contain substr.
func (s *SyncBuffer) Lines(substr string) []string {
	var out []string
	for _, l := range strings.Split(s.String(), "\n") {
		if l != "" && strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return out
}
