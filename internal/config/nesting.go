package config

import (
	"bytes"
	"fmt"
)

// MaxNesting bounds how deep a config file may nest: arrays and inline
// tables inside each other, the parts of one dotted key, and the depth
// of a key in the document (its table header's parts, the keys of the
// inline tables around it and its own parts together). The TOML decoder
// spends time and memory on every key in proportion to its depth, so
// depth times the number of keys, or depth squared for one deep chain: a
// 16 KB file of inline tables 4000 deep takes seconds and 750 MB, and
// the file is re-read on every restart. baton's own keys go two deep
// (listen.http).
const MaxNesting = 32

// checkNesting refuses text that nests deeper than MaxNesting, in one
// pass that costs no more than reading it, so that the decoder never
// sees it. It knows TOML's strings and comments, whose brackets, dots
// and quotes are text, and enough of the structure to tell a table
// header from an array and to add up the parts of the keys a value sits
// under. On text that is not TOML it may count differently from the
// decoder, but the decoder stops at the first error, and up to there the
// text is TOML. Its errors start with "line N: ".
func checkNesting(data []byte) error { return scanNesting(data, MaxNesting) }

// scanNesting is checkNesting with limit in place of MaxNesting.
func scanNesting(data []byte, limit int) error {
	type frame struct {
		open byte // '{', '[', or 'h' for a bracket of a table header
		path int  // the key parts that the values inside sit under
	}
	var (
		stack []frame
		line  = 1
		// last is the last structural byte: = { } [ ] , or a newline.
		last byte = '\n'
		// parts counts the parts of the key being read: the dots since
		// last, plus one. A value has at most one dot (1.5, a time's
		// fraction) and never gets to a '=' to count.
		parts = 1
		// header is the parts of the last table header, valPath those
		// of the key before the last '='.
		header, valPath int
	)
	// base is the number of key parts above a key read at this point.
	base := func() int {
		if len(stack) == 0 {
			return header
		}
		return stack[len(stack)-1].path
	}
	for i := 0; i < len(data); i++ {
		switch c := data[i]; c {
		case '\n':
			line++
			last, parts = c, 1
		case '#':
			// A comment runs to the end of the line; the newline is
			// left for the loop, which counts it.
			j := bytes.IndexByte(data[i:], '\n')
			if j < 0 {
				return nil
			}
			i += j - 1
		case '"', '\'':
			end, newlines := skipString(data, i)
			line += newlines
			i = end - 1
		case '.':
			parts++
			if parts > limit {
				return fmt.Errorf("line %d: a dotted key of more than %d parts; baton's keys have at most 2 (listen.http = \"tcp://:8080\")", line, limit)
			}
		case '=':
			p := base() + parts
			if p > limit {
				return fmt.Errorf("line %d: a key nested more than %d deep (its table header, the keys of the inline tables around it and its own dotted parts together); baton's keys go at most 2 deep (listen.http, env.NAME)", line, limit)
			}
			valPath = p
			last, parts = c, 1
		case '{', '[':
			f := frame{open: c}
			n := len(stack)
			switch {
			case c == '[' && (n == 0 && last == '\n' || n > 0 && stack[n-1].open == 'h' && last == '['):
				// [table] or [[array.of.tables]]: a '[' where a key
				// could start a line.
				f.open = 'h'
			case last == '=':
				f.path = valPath
			default: // an element of an array
				f.path = base()
			}
			if n+1 > limit {
				return fmt.Errorf("line %d: arrays and inline tables nested more than %d deep; baton's values nest at most 1 deep (command = [...], listen = {...})", line, limit)
			}
			stack = append(stack, f)
			last, parts = c, 1
		case '}', ']':
			if n := len(stack); n > 0 {
				// The innermost ']' of a header ends its key; the outer
				// one of [[...]] comes right after another ']'.
				if stack[n-1].open == 'h' && last != ']' {
					header = parts
				}
				stack = stack[:n-1]
			}
			last, parts = c, 1
		case ',':
			last, parts = c, 1
		}
	}
	return nil
}

// skipString returns the index just past the TOML string that starts
// with the quote at data[i], and the newlines in it. A one-line string
// left open ends before the newline, a multi-line one at the end of the
// data: the decoder refuses either.
func skipString(data []byte, i int) (end, newlines int) {
	q := data[i]
	basic := q == '"' // backslash escapes
	if i+2 < len(data) && data[i+1] == q && data[i+2] == q {
		for j := i + 3; j < len(data); j++ {
			switch {
			case data[j] == '\n':
				newlines++
			case basic && data[j] == '\\':
				// Skip the escaped byte, which may be the newline of a
				// line-ending backslash.
				if j+1 < len(data) && data[j+1] == '\n' {
					newlines++
				}
				j++
			case data[j] == q && j+2 < len(data) && data[j+1] == q && data[j+2] == q:
				// Up to two more quotes just inside the closing three
				// belong to the string: """say "hi"""""
				j += 3
				for k := 0; k < 2 && j < len(data) && data[j] == q; k++ {
					j++
				}
				return j, newlines
			}
		}
		return len(data), newlines
	}
	for j := i + 1; j < len(data); j++ {
		switch {
		case data[j] == '\n':
			return j, newlines
		case basic && data[j] == '\\' && j+1 < len(data) && data[j+1] != '\n':
			j++
		case data[j] == q:
			return j + 1, newlines
		}
	}
	return len(data), newlines
}
