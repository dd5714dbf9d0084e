package main

import (
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"
)

// ---- figures ----

func pct(s []time.Duration, p int) time.Duration {
	// Nearest rank.
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))]
}

func pctF(s []float64, p int) float64 {
	if len(s) == 0 {
		return 0
	}
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// medianOf is the median of f over runs.
func medianOf[T any](runs []T, f func(T) float64) float64 {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func distinctErrors(lists [][]string, n int) []string {
	seen := map[string]bool{}
	var out []string
	for _, errs := range lists {
		for _, e := range errs {
			if _, msg, ok := strings.Cut(e, " "); ok {
				e = msg
			}
			key := digits.ReplaceAllString(e, "N")
			if !seen[key] && len(out) < n {
				seen[key] = true
				out = append(out, e)
			}
		}
	}
	return out
}

var digits = regexp.MustCompile(`[0-9]+`)

// writeFirstFailures lists, under header, up to four failure messages of
// distinct kinds from the errors of runs; nothing when there are none.
func writeFirstFailures[T any](w io.Writer, header string, runs []T, errorsOf func(T) []string) {
	var lists [][]string
	for _, r := range runs {
		lists = append(lists, errorsOf(r))
	}
	writeErrList(w, header, distinctErrors(lists, 4))
}

// writeErrList lists errs under title, each as code; nothing when there
// are none.
func writeErrList(w io.Writer, title string, errs []string) {
	if len(errs) == 0 {
		return
	}
	fmt.Fprintf(w, "%s:\n\n", title)
	for _, e := range errs {
		fmt.Fprintf(w, "- `%s`\n", e)
	}
	fmt.Fprintln(w)
}
