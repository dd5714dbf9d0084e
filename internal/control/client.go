package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"time"
)

// Client errors. Use errors.Is; the returned errors wrap them with the
// socket path and the underlying cause.
var (
	// ErrNoSupervisor: nothing listens at the path (missing, stale or not
	// a socket).
	ErrNoSupervisor = errors.New("no supervisor listening")
	// ErrPermission: the socket file's permissions refused the connect.
	// A supervisor that refuses the peer answers ResultDenied instead.
	ErrPermission = errors.New("permission denied")
	// ErrTimeout: the context's deadline passed before the result arrived.
	// With ErrNotSent too, it passed before the request was sent.
	ErrTimeout = errors.New("timed out waiting for the supervisor")
	// ErrNotSent: the request never reached the supervisor, so nothing
	// was started for it.
	ErrNotSent = errors.New("request not sent")
	// ErrProtocol: the supervisor's answer was not a valid response.
	ErrProtocol = errors.New("protocol error")
	// ErrNoResult: the supervisor closed the connection without a result:
	// it went away (stopped, crashed or was killed) mid-request, so the
	// outcome is unknown.
	ErrNoResult = errors.New("supervisor closed the connection without a result")
	// ErrUntrusted: the process listening at the path is not one the
	// client sends requests to (see UntrustedError); nothing was sent.
	ErrUntrusted = errors.New("untrusted listener")
)

// maxResponseLine bounds one line from the supervisor; a status with many
// generations is a few KiB, so this is generous.
const maxResponseLine = 1 << 20

// statusRetry bounds how long GetStatus keeps trying while a connection
// limit refuses it: long enough for idle connections to be closed
// (RequestIdleTimeout), short enough for a quick look.
const statusRetry = 2*RequestIdleTimeout + time.Second

// lastAttempt is how long before ctx's deadline retryLimit stops: an
// attempt needs about that long to get its answer.
const lastAttempt = 50 * time.Millisecond

// Restart asks the supervisor at path for a restart and waits for its
// result. With wait, the request queues behind a restart already running
// instead of getting ResultBusy, and a connection limit (a busy result
// with Result.Limit set) is retried until ctx is done; the last such busy
// result is returned then. progress, if not nil, is called for each
// progress line, on the calling goroutine.
func Restart(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpRestart, Wait: wait}, progress, retryWindow(wait))
}

// Upgrade asks the supervisor at path to replace itself with the baton
// binary now at its path, and waits for the result. wait and progress are
// as for Restart.
func Upgrade(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpUpgrade, Wait: wait}, progress, retryWindow(wait))
}

// RestartCanary asks for a restart whose new generation becomes a canary
// with permille thousandths of new connections (MinCanaryPermille..
// MaxCanaryPermille). wait and progress are as for Restart.
func RestartCanary(ctx context.Context, path string, wait bool, permille int, progress func(Event)) (Result, error) {
	return retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpRestart, Wait: wait, CanaryPermille: permille}, progress, retryWindow(wait))
}

// Promote asks the supervisor at path to make its canary generation the
// working one. wait and progress are as for Restart.
func Promote(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpPromote, Wait: wait}, progress, retryWindow(wait))
}

// Rollback asks the supervisor at path to drain its canary generation.
// wait and progress are as for Restart.
func Rollback(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpRollback, Wait: wait}, progress, retryWindow(wait))
}

// GetStatus asks the supervisor at path for its status; on success
// Result.Status is set. A connection limit is retried for a few seconds
// (within ctx) before its busy result is returned.
func GetStatus(ctx context.Context, path string) (Result, error) {
	res, err := retryLimit(ctx, path, Request{V: ProtocolVersion, Op: OpStatus}, nil, statusRetry)
	if err == nil && res.Result == ResultOK && res.Status == nil {
		return res, fmt.Errorf("%w: %s: status result without a status", ErrProtocol, path)
	}
	return res, err
}

// retryWindow: without wait, a busy answer is the caller's to see at once.
func retryWindow(wait bool) time.Duration {
	if wait {
		return -1
	}
	return 0
}

// retryLimit sends req until the answer is anything but a connection
// limit's busy, for at most window (negative: until ctx is done). Such an
// answer means the request was not read, so sending it again is safe.
func retryLimit(ctx context.Context, path string, req Request, progress func(Event), window time.Duration) (Result, error) {
	var deadline time.Time
	if window > 0 {
		deadline = time.Now().Add(window)
	}
	delay := 10 * time.Millisecond
	for {
		res, err := roundTrip(ctx, path, req, progress)
		if err != nil || res.Result != ResultBusy || res.Limit == "" || window == 0 {
			return res, err
		}
		// Jitter, so clients refused together do not all come back at
		// the same instant.
		sleep := delay/2 + rand.N(delay)
		if !deadline.IsZero() && time.Now().Add(sleep).After(deadline) {
			return res, nil
		}
		// An attempt cut short by ctx could not tell whether the request
		// got in; give up while the refusal is still the answer.
		if d, ok := ctx.Deadline(); ok && time.Now().Add(sleep+lastAttempt).After(d) {
			return res, nil
		}
		t := time.NewTimer(sleep)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return res, nil
		}
		delay = min(2*delay, 250*time.Millisecond)
	}
}

func roundTrip(ctx context.Context, path string, req Request, progress func(Event)) (Result, error) {
	c, err := dial(ctx, path)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	// Unblocks a pending read or write as soon as ctx ends.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()

	// Whoever can write to the socket's directory can plant a socket
	// there: the request, and trust in the answer, go only to a listener
	// run by root, the directory's owner, or ourselves.
	if err := checkListener(c, path); err != nil {
		return Result{}, err
	}

	b, err := json.Marshal(req)
	if err != nil {
		return Result{}, fmt.Errorf("encode request: %w", err)
	}
	_, werr := c.Write(append(b, '\n'))
	// Even if the write failed, the supervisor may have answered before
	// closing (a denied peer gets its result without being read), so the
	// answer is still read.

	br := bufio.NewReaderSize(c, 64<<10)
	for {
		line, err := readLine(br)
		if err != nil {
			if errors.Is(werr, os.ErrDeadlineExceeded) && ctx.Err() != nil {
				// The deadline stopped the write: a request this short
				// goes out whole or not at all.
				return Result{}, notSent(ctx, path)
			}
			if werr != nil && !isClosed(err) {
				return Result{}, fmt.Errorf("send request to %s: %w", path, opError(werr))
			}
			return Result{}, readError(ctx, path, err)
		}
		var head struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(line, &head); err != nil {
			return Result{}, fmt.Errorf("%w: %s: bad line from supervisor: %w", ErrProtocol, path, err)
		}
		switch head.Type {
		case TypeProgress:
			var ev Event
			if err := json.Unmarshal(line, &ev); err != nil {
				return Result{}, fmt.Errorf("%w: %s: bad progress line: %w", ErrProtocol, path, err)
			}
			if progress != nil {
				progress(ev)
			}
		case TypeResult:
			var res Result
			if err := json.Unmarshal(line, &res); err != nil {
				return Result{}, fmt.Errorf("%w: %s: bad result line: %w", ErrProtocol, path, err)
			}
			if res.Result == "" {
				return Result{}, fmt.Errorf("%w: %s: result line without a result code", ErrProtocol, path)
			}
			return res, nil
		default:
			// A newer supervisor may send line types this client does not
			// know; they are informational by contract.
		}
	}
}

func dial(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	delay := 5 * time.Millisecond
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			uc, ok := c.(*net.UnixConn)
			if !ok {
				c.Close()
				return nil, fmt.Errorf("connect to %s: got a %T, not a Unix socket", path, c)
			}
			return uc, nil
		}
		var errno syscall.Errno
		errors.As(err, &errno)
		switch {
		case errno == syscall.EAGAIN:
			// The listen backlog is full: the supervisor is alive but
			// busy accepting, so try again within the deadline.
			select {
			case <-time.After(delay):
				delay = min(2*delay, 200*time.Millisecond)
				continue
			case <-ctx.Done():
				return nil, notSent(ctx, path)
			}
		case errno == syscall.ENOENT, errno == syscall.ECONNREFUSED,
			errno == syscall.ENOTSOCK, errno == syscall.ENOTDIR:
			return nil, fmt.Errorf("%w at %s (%w)", ErrNoSupervisor, path, errno)
		case errno == syscall.EACCES, errno == syscall.EPERM:
			// EACCES's text is "permission denied" again; say what refused.
			why := "the socket's permissions refuse this user"
			if errno == syscall.EPERM {
				why = errno.Error()
			}
			return nil, &multiError{msg: fmt.Sprintf("%v connecting to %s (%s)", ErrPermission, path, why), errs: []error{ErrPermission, errno}}
		case ctx.Err() != nil:
			return nil, notSent(ctx, path)
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The dial's deadline is the context's, and may fire a
			// moment before the context reports it.
			select {
			case <-ctx.Done():
				return nil, notSent(ctx, path)
			case <-time.After(time.Second):
			}
		}
		return nil, fmt.Errorf("connect to %s: %w", path, opError(err))
	}
}

// multiError has its own text and matches each of errs with errors.Is.
type multiError struct {
	msg  string
	errs []error
}

func (e *multiError) Error() string   { return e.msg }
func (e *multiError) Unwrap() []error { return e.errs }

// opError drops net.OpError's "dial unix /path:" prefix: the caller's
// message names the path already.
func opError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}

func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > maxResponseLine {
			return nil, fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, maxResponseLine)
		}
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > 0 && errors.Is(err, io.EOF) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

// isClosed reports whether a read ended because the supervisor closed the
// connection. ECONNRESET is what a Unix socket reports when it closed with
// our request still unread; to the user it is the same as end-of-file.
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func readError(ctx context.Context, path string, err error) error {
	if ctx.Err() != nil {
		return ctxError(ctx, path)
	}
	if errors.Is(err, ErrProtocol) {
		return fmt.Errorf("%s: %w", path, err)
	}
	if isClosed(err) {
		return fmt.Errorf("%w at %s", ErrNoResult, path)
	}
	return fmt.Errorf("read from %s: %w", path, opError(err))
}

func ctxError(ctx context.Context, path string) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w at %s", ErrTimeout, path)
	}
	return fmt.Errorf("request to %s: %w", path, ctx.Err())
}

// notSent is ctxError for a context that ended before the request went out.
func notSent(ctx context.Context, path string) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &multiError{msg: fmt.Sprintf("timed out connecting to %s: the request was not sent", path), errs: []error{ErrTimeout, ErrNotSent}}
	}
	return &multiError{msg: fmt.Sprintf("request to %s not sent: %v", path, ctx.Err()), errs: []error{ctx.Err(), ErrNotSent}}
}
